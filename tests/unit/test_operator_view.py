"""The operator's view as data: sources of values, redaction, loopback, the admin token,
the tested engine versions, and the text `vllm-guard status` prints."""

from __future__ import annotations

import pytest

from gateway.admin import admin_token, is_loopback
from gateway.config import AdminConfig, ConfigError, parse_config
from gateway.engineview import version_tested
from gateway.status import REDACTED, effective_config, redact_command, render_status


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["vllm", "--api-key", "s3cret", "--port", "1"],
            ["vllm", "--api-key", REDACTED, "--port", "1"],
        ),
        (["vllm", "--api-key=s3cret"], ["vllm", f"--api-key={REDACTED}"]),
        (["vllm", "--port", "1"], ["vllm", "--port", "1"]),
        (None, None),
    ],
)
def test_redact_command(argv: list[str] | None, expected: list[str] | None) -> None:
    """The value of --api-key never leaves the gateway, in either spelling."""
    assert redact_command(argv) == expected


def test_effective_config_names_each_source_and_redacts() -> None:
    """file for what config.yaml set (with its key), default otherwise, engine for a
    context length read from the engine; engine.env values hidden."""
    config = parse_config(
        {
            "server": {"port": 9000},
            "engine": {"command": ["vllm", "--api-key", "k"], "env": {"HF_TOKEN": "hf_x"}},
            "defaults": {"max_tokens_limit": 100},
            "models": {"tiny": {"default_max_tokens": 5}},
        }
    )
    view = effective_config(config, {"tiny": 512, "lora": 512})
    assert view["server"]["port"] == {"value": 9000, "source": "file", "key": "server.port"}
    assert view["server"]["host"]["source"] == "default"
    assert view["engine"]["env"]["value"] == {"HF_TOKEN": REDACTED}
    assert "k" not in view["engine"]["command"]["value"]
    assert "hf_x" not in str(view)
    tiny = view["models"]["tiny"]["policy"]
    assert tiny["default_max_tokens"]["key"] == "models.tiny.default_max_tokens"
    assert tiny["max_tokens_limit"] == {
        "value": 100,
        "source": "file",
        "key": "defaults.max_tokens_limit",
    }
    assert tiny["max_n"]["source"] == "default"
    assert tiny["context_length"]["source"] == "engine"
    assert tiny["context_length"]["value"] == 512
    assert view["models"]["lora"]["configured"] is False
    assert view["models"]["lora"]["served"] is True


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.0.0.5", False),
        ("admin.internal", False),
    ],
)
def test_loopback(host: str, loopback: bool) -> None:
    """Loopback is 127.0.0.0/8 and ::1 (and the name localhost); nothing else."""
    assert is_loopback(host) is loopback


def test_admin_token_required_off_loopback() -> None:
    """Off loopback the token comes from the variable admin.token_env names; without it the
    listener refuses (a ConfigError naming the variable); on loopback none is needed."""
    assert admin_token(AdminConfig(host="127.0.0.1"), {}) is None
    config = AdminConfig(host="0.0.0.0", token_env="MY_TOKEN")
    with pytest.raises(ConfigError, match="MY_TOKEN"):
        admin_token(config, {"MY_TOKEN": "  "})
    assert admin_token(config, {"MY_TOKEN": "abc"}) == "abc"


@pytest.mark.parametrize(
    ("version", "tested"),
    [("0.32.0", True), ("0.32.1+cpu", True), ("0.31.9", False), ("0.320.0", False), ("1.0", False)],
)
def test_tested_versions(version: str, tested: bool) -> None:
    """Only vLLM 0.32.x counts as tested."""
    assert version_tested(version) is tested


def test_render_status_for_a_person() -> None:
    """The terminal view shows the generation, the last reload and its error, what waits for
    a restart, the engine with its recent changes, the quarantine and effective values."""
    config = parse_config({"models": {"tiny": {"default_max_tokens": 5}}})
    view = {
        "config": {
            "path": "/etc/guard/config.yaml",
            "generation": 3,
            "loaded_at": 0,
            "failures": 1,
            "last_reload": {
                "outcome": "invalid",
                "trigger": "file",
                "at": 0,
                "error": "x: invalid configuration\n  models.tiny.max_n (line 3): bad",
            },
            "pending_gateway_restart": ["server.port"],
            "pending_engine_restart": ["engine.command"],
            "warnings": [],
        },
        "engine": {
            "state": "ready",
            "supervised": True,
            "epoch": 2,
            "version": "0.32.0",
            "models": {"tiny": 512},
            "recent_changes": [
                {"at": 0, "from": "starting", "to": "ready", "reason": "probe answered"}
            ],
        },
        "in_flight": 1,
        "quarantine": {
            "entries": [{"fingerprint": "ab12", "model": "tiny", "until": 0, "reason": "died"}],
            "suspects": [],
        },
        "effective": effective_config(config, {"tiny": 512}),
    }
    text = render_status(view)
    assert "generation 3" in text
    assert "last reload invalid (file)" in text
    assert "models.tiny.max_n (line 3): bad" in text
    assert "server.port: changed in the file, applies at the next gateway start" in text
    assert "engine.command: applies at the next engine restart" in text
    assert "engine      ready  (supervised, epoch 2, version 0.32.0)" in text
    assert "starting -> ready  probe answered" in text
    assert "quarantine  1 entries, 0 suspects" in text
    assert "default_max_tokens = 5  [file (models.tiny.default_max_tokens)]" in text
    assert "context_length = 512  [engine]" in text
