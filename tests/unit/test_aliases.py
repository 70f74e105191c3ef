"""Which policy a served name takes (gateway.aliases) and the model each /v1/models entry
serves (engine.detect.parse_model_families)."""

from __future__ import annotations

import pytest

from engine.detect import parse_model_families
from gateway.aliases import policy_name, without_own_policy

MODELS = {
    "object": "list",
    "data": [
        {"id": "tiny", "root": "/models/tiny", "parent": None, "max_model_len": 512},
        {"id": "tiny-alias", "root": "/models/tiny", "parent": None, "max_model_len": 512},
        {"id": "big", "root": "/models/big", "parent": None, "max_model_len": 4096},
        {"id": "tiny-lora", "root": "/adapters/x", "parent": "tiny"},  # adapters list no length
        {"id": "bare", "max_model_len": 512},
    ],
}
FAMILIES = parse_model_families(MODELS)  # engine.facts.EngineFacts.families


def test_families_follow_root_and_parent() -> None:
    """Names with one root are one model; an adapter belongs to its parent's model; an entry
    without a root is a model of its own."""
    assert FAMILIES == {
        "tiny": "/models/tiny",
        "tiny-alias": "/models/tiny",
        "big": "/models/big",
        "tiny-lora": "/models/tiny",
        "bare": "bare",
    }


@pytest.mark.parametrize(
    ("model", "configured", "expected"),
    [
        ("tiny", {"tiny"}, "tiny"),
        ("tiny-alias", {"tiny"}, "tiny"),
        ("tiny-lora", {"tiny"}, "tiny"),
        ("tiny-lora", {"tiny-alias"}, "tiny-alias"),
        ("tiny-alias", {"tiny", "tiny-alias"}, "tiny-alias"),
        ("big", {"tiny"}, None),
        ("unknown", {"tiny"}, None),
        ("unknown", {"unknown"}, "unknown"),
        (None, {"tiny"}, None),
    ],
)
def test_policy_name(model: str | None, configured: set[str], expected: str | None) -> None:
    """A name keeps its own entry, else takes a sibling name's, else the defaults (None)."""
    assert policy_name(model, FAMILIES, configured) == expected


def test_names_without_own_policy() -> None:
    """Every served name without an entry, with what it takes instead."""
    assert without_own_policy(FAMILIES, {"tiny"}) == {
        "tiny-alias": "tiny",
        "big": None,
        "tiny-lora": "tiny",
        "bare": None,
    }
