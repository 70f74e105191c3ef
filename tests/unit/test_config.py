"""config.yaml: frozen snapshots, strict keys, errors that name key and line, the CLI check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydantic
import pytest

from gateway.config import (
    DEFAULT_RELAY_PATHS,
    ConfigError,
    ConfigHolder,
    OnExceed,
    PolicyMode,
    load_config,
    parse_config,
)
from tests.helpers import ROOT


def test_repo_config_loads_and_resolves_model_policies() -> None:
    """The shipped config.yaml is valid and a model entry overrides defaults field by field."""
    config = load_config(ROOT / "config.yaml")
    tiny = config.policy_for("tiny")
    assert tiny.default_max_tokens == 128
    assert tiny.max_tokens_limit == 256
    assert tiny.on_exceed == config.policy_for(None).on_exceed
    assert config.policy_for("unknown") == config.policy_for(None)
    assert config.engine.command is not None


def test_defaults_without_a_file() -> None:
    """An empty file means the documented defaults: 0.0.0.0:8080, engine on 8000."""
    config = parse_config(None)
    assert (config.server.host, config.server.port) == ("0.0.0.0", 8080)
    assert config.engine.url == "http://127.0.0.1:8000"
    assert config.server.relay_paths == DEFAULT_RELAY_PATHS
    assert config.server.max_body_bytes == 4 * 1024 * 1024
    policy = config.policy_for(None)
    assert policy.on_exceed is OnExceed.CLAMP
    assert policy.mode is PolicyMode.ENFORCE


def test_snapshot_is_frozen_and_swapped_whole() -> None:
    """A loaded config cannot be changed in place; a holder swaps whole snapshots."""
    first, second = parse_config({}), parse_config({"server": {"port": 9000}})
    with pytest.raises(pydantic.ValidationError):
        first.server.port = 1  # type: ignore[misc]
    holder = ConfigHolder(first)
    assert holder.swap(second) is first
    assert holder.current.server.port == 9000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("server:\n  prot: 80\n", "server.prot (line 2): Extra inputs are not permitted"),
        ("defaults:\n  on_exceed: chop\n", "defaults.on_exceed (line 2)"),
        ("models:\n  tiny:\n    max_tokens_limit: -3\n", "models.tiny.max_tokens_limit (line 3)"),
        ('server:\n  relay_paths: ["POST /v1/completions"]\n', "generation paths"),
        ('server:\n  relay_paths: ["/v1/models"]\n', "must look like 'GET /path'"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("server: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_files_name_the_key_and_what_is_wrong(tmp_path: Path, text: str, expected: str) -> None:
    """Loading a bad file fails with a message that names the key, its line and the fault."""
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert expected in str(info.value)


def test_check_config_command_exit_codes(tmp_path: Path) -> None:
    """`vllm-guard check-config` exits 0 for a good file and 1 for a bad one."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine:\n  urll: x\n")
    cmd = [sys.executable, "-m", "gateway", "check-config"]
    good = subprocess.run(
        [*cmd, str(ROOT / "config.yaml")], capture_output=True, text=True, check=False, timeout=60
    )
    assert good.returncode == 0, good.stderr
    failed = subprocess.run(
        [*cmd, str(bad)], capture_output=True, text=True, check=False, timeout=60
    )
    assert failed.returncode == 1
    assert "engine.urll (line 2)" in failed.stderr
