"""The supervisor's probe and restart rules as tables: which generation path the readiness
probe takes, what /v1/models and /metrics say, and what proves a sidecar engine restarted."""

from __future__ import annotations

import pytest

from engine.detect import (
    START_TIME,
    parse_marks,
    probe_kinds,
    probe_request,
    restart_evidence,
)
from engine.facts import ModelFacts, parse_facts


@pytest.mark.parametrize(
    ("mode", "discovered", "expected"),
    [
        ("auto", None, ("completions", "chat")),
        ("auto", "chat", ("chat",)),
        ("auto", "completions", ("completions",)),
        ("completions", None, ("completions",)),
        ("completions", "chat", ("completions",)),
        ("chat", None, ("chat",)),
    ],
)
def test_probe_kinds(mode: str, discovered: str | None, expected: tuple[str, ...]) -> None:
    """`auto` tries completions then chat until one path is discovered for this start; a
    configured path is always the one probed."""
    assert probe_kinds(mode, discovered) == expected  # type: ignore[arg-type]


def test_probe_requests_ask_for_one_greedy_token() -> None:
    """Both probe bodies name the model and ask for exactly one greedy token."""
    path, body = probe_request("chat", "m")
    assert path == "/v1/chat/completions"
    assert body["messages"] == [{"role": "user", "content": "ping"}]
    path, body = probe_request("completions", "m")
    assert path == "/v1/completions"
    assert body["prompt"] == "ping"
    for _, body in (probe_request("chat", "m"), probe_request("completions", "m")):
        assert (body["model"], body["max_tokens"], body["temperature"]) == ("m", 1, 0)


def test_facts_keep_roots_and_lora_parents() -> None:
    """The engine's facts keep each model's root and parent; an adapter takes its parent's
    max_model_len, and the first listed model is the default."""
    facts = parse_facts(
        {
            "data": [
                {"id": "base", "root": "/models/base", "max_model_len": 4096},
                {"id": "ad", "root": "/adapters/ad", "parent": "base"},
                {"no": "id"},
            ]
        }
    )
    assert facts.default_model == "base"
    assert dict(facts.models) == {
        "base": ModelFacts("base", 4096, "/models/base", None),
        "ad": ModelFacts("ad", 4096, "/adapters/ad", "base"),
    }
    assert dict(facts.lengths) == {"base": 4096, "ad": 4096}
    assert parse_facts({"data": "nope"}).default_model is None


METRICS = """\
# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.
# TYPE process_start_time_seconds gauge
process_start_time_seconds 1.7e+09
vllm:request_success_total{engine="0",finished_reason="length",model_name="tiny"} 3.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="tiny"} 2.0
vllm:generation_tokens_total{engine="0",model_name="tiny"} 40.0
vllm:generation_tokens_created{engine="0",model_name="tiny"} 1.7e+09
"""


def test_parse_marks_sums_each_counter_over_its_labels() -> None:
    """The marks are the start time and each restart counter summed over its label sets."""
    assert parse_marks(METRICS) == {
        START_TIME: 1.7e9,
        "vllm:request_success_total": 5.0,
        "vllm:generation_tokens_total": 40.0,
    }


GEN = "vllm:generation_tokens_total"


@pytest.mark.parametrize(
    ("before", "after", "refused", "expected"),
    [
        ({START_TIME: 1.0, GEN: 9}, {START_TIME: 1.0, GEN: 0}, True, None),  # same process
        ({START_TIME: 1.0, GEN: 9}, {START_TIME: 2.0, GEN: 99}, False, "changed"),
        ({GEN: 9}, {GEN: 3}, False, "went backwards"),
        ({GEN: 9}, {GEN: 9}, False, None),  # same counters, nothing refused: same engine
        ({GEN: 9}, {GEN: 12}, True, "refused"),  # gone, and back with more counted
        (None, None, True, "refused"),  # no /metrics: the connections decide
        (None, None, False, None),
        ({GEN: 9}, None, False, None),
        ({}, {GEN: 1}, False, None),
    ],
)
def test_restart_evidence(
    before: dict[str, float] | None,
    after: dict[str, float] | None,
    refused: bool,
    expected: str | None,
) -> None:
    """A new start time, else a counter gone backwards, else a refused connection before a
    healthy answer proves a restart; the same start time proves the same process."""
    evidence = restart_evidence(before, after, refused)
    if expected is None:
        assert evidence is None
    else:
        assert evidence is not None
        assert expected in evidence
