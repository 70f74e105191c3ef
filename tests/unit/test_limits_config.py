"""The `limits` block of the policy: documented defaults, deep merge over defaults, strict keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import (
    ENGINE_INTERNAL_FIELDS,
    ConfigError,
    ForbiddenAction,
    Limits,
    LimitsOverride,
    RemoteMedia,
    load_config,
    parse_config,
)

ROOT = Path(__file__).resolve().parents[2]


def test_every_limit_can_be_overridden() -> None:
    """LimitsOverride names exactly the fields of Limits, so no limit is unreachable from YAML."""
    assert set(LimitsOverride.model_fields) == set(Limits.model_fields)


def test_defaults_are_the_safe_ones() -> None:
    """Without a `limits:` block: remote media and prompt_logprobs closed, engine-internal
    fields refused, vLLM's default --max-logprobs mirrored."""
    limits = parse_config({}).policy_for(None).limits
    assert limits.remote_media is RemoteMedia.REFUSE
    assert limits.prompt_logprobs is False
    assert limits.forbidden_fields == ENGINE_INTERNAL_FIELDS
    assert "kv_transfer_params" in limits.forbidden
    assert limits.forbidden_action is ForbiddenAction.REFUSE
    assert limits.max_logprobs == 20
    assert limits.structured_outputs is True


def test_partial_model_limits_keep_the_defaults_limits() -> None:
    """A model's partial `limits:` overrides only the fields it names; the rest come from
    `defaults.limits`, then from the built-in defaults (the merge is deep, not shallow)."""
    config = parse_config(
        {
            "defaults": {"max_n": 4, "limits": {"max_stop": 10, "prompt_logprobs": True}},
            "models": {
                "a": {"limits": {"max_stop": 3}},
                "b": {"max_tokens_limit": 100},
                "c": {"limits": {"remote_media": "allow-list", "remote_media_hosts": ["x.org"]}},
            },
        }
    )
    a = config.policy_for("a")
    assert a.limits.max_stop == 3
    assert a.limits.prompt_logprobs is True  # from defaults.limits
    assert a.limits.max_logprobs == 20  # built in
    assert a.max_n == 4
    assert config.policy_for("b").limits.max_stop == 10
    c = config.policy_for("c").limits
    assert c.media_hosts == frozenset({"x.org"})
    assert (c.max_stop, c.prompt_logprobs) == (10, True)
    assert config.policy_for(None).limits.max_stop == 10


def test_a_mistyped_limit_is_an_error_naming_it() -> None:
    """An unknown key under limits is refused with its path, not ignored."""
    with pytest.raises(ConfigError, match=r"models\.a\.limits\.max_stops"):
        parse_config({"models": {"a": {"limits": {"max_stops": 3}}}})


def test_the_shipped_config_states_the_defaults() -> None:
    """config.yaml's `defaults.limits` documents the built-in defaults, value for value."""
    config = load_config(ROOT / "config.yaml")
    assert config.policy_for(None).limits == Limits()
