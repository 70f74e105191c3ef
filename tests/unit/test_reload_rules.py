"""Live reload's pure rules: what changed, what is kept until a restart, when a file counts
as changed (ConfigMap symlink swap, editor's rename), and a snapshot validated files and all."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, parse_config
from gateway.reload import changed_keys, file_stamp, pin_fixed
from gateway.snapshot import load_snapshot
from gateway.tokens import TokenCounters
from tests.helpers import MODEL_DIR, configmap_swap


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ({"a": 1}, {"a": 1}, []),
        ({"a": 1}, {"a": 2}, ["a"]),
        ({"s": {"x": 1, "y": 2}}, {"s": {"x": 1, "y": 3}}, ["s.y"]),
        ({"m": {}}, {"m": {"tiny": {"k": 1}}}, ["m.tiny"]),
        ({"l": [1, 2]}, {"l": [2, 1]}, ["l"]),
        ({"a": 1, "b": 2}, {"b": 2}, ["a"]),
    ],
)
def test_changed_keys(old: dict[str, Any], new: dict[str, Any], expected: list[str]) -> None:
    """Dotted keys of the values that differ, nested mappings descended, lists whole."""
    assert changed_keys(old, new) == expected


def _config(**sections: Any) -> Any:
    return parse_config(sections)


def test_pin_fixed_keeps_listeners_and_names_them() -> None:
    """A new port, body cap, admin listener and engine URL wait for a restart (kept at the
    running values, named); the relay paths and policies apply."""
    running = _config(server={"port": 8080}, engine={"url": "http://127.0.0.1:8000"})
    new = _config(
        server={"port": 9090, "max_body_bytes": 10, "relay_paths": ["GET /version"]},
        admin={"port": 9999},
        engine={"url": "http://127.0.0.1:9000", "probe_interval_s": 1},
        defaults={"max_tokens_limit": 7},
    )
    pinned, fixed, later = pin_fixed(running, new)
    assert (pinned.server.port, pinned.server.max_body_bytes) == (
        8080,
        running.server.max_body_bytes,
    )
    assert pinned.admin == running.admin
    assert pinned.engine.url == "http://127.0.0.1:8000"
    assert pinned.engine.probe_interval_s == 1
    assert pinned.server.relay_set == frozenset({"GET /version"})
    assert pinned.policy_for("any").max_tokens_limit == 7
    assert set(fixed) == {"server.port", "server.max_body_bytes", "admin.port", "engine.url"}
    assert later == ()


def test_pin_fixed_keeps_the_shared_quarantine_connection() -> None:
    """Turning the shared quarantine on (or pointing it at another Redis) waits for a gateway
    restart, while the rest of `isolation` applies at once."""
    running = _config()
    new = _config(
        isolation={"queue_max": 3, "shared": {"url": "redis://127.0.0.1:6379/0"}},
    )
    pinned, fixed, _ = pin_fixed(running, new)
    assert pinned.isolation.shared is None
    assert pinned.isolation.queue_max == 3
    assert fixed == ("isolation.shared",)


def test_engine_command_applies_at_next_restart_but_not_the_shape() -> None:
    """A changed command or environment is applied (used at the next engine start) and named;
    going from supervised to sidecar is the gateway's shape and is kept."""
    running = _config(engine={"command": ["a", "--x"], "env": {"K": "1"}})
    pinned, fixed, later = pin_fixed(
        running, _config(engine={"command": ["a", "--y"], "env": {"K": "2"}})
    )
    assert pinned.engine.command == ("a", "--y")
    assert fixed == ()
    assert later == ("engine.command", "engine.env")
    pinned, fixed, later = pin_fixed(running, _config())
    assert pinned.engine.command == ("a", "--x")
    assert pinned.engine.env == {"K": "1"}
    assert fixed == ("engine.command (supervised or sidecar)",)
    assert later == ()


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_stamp_sees_a_configmap_swap(tmp_path: Path) -> None:
    """The stamp of config.yaml changes when `..data` is swapped to a new folder, although
    the link config.yaml and even the file's size stay the same."""
    link = configmap_swap(tmp_path, "a: 1\n", "2026_12_01_08_00_00.1")
    before = file_stamp(link)
    again = file_stamp(link)
    assert before is not None
    assert before == again
    configmap_swap(tmp_path, "a: 2\n", "2026_12_01_08_00_05.2")
    after = file_stamp(link)
    assert after is not None
    assert after != before
    assert after[0].endswith("2026_12_01_08_00_05.2/config.yaml")


def test_stamp_sees_write_then_rename(tmp_path: Path) -> None:
    """An editor's save (write a new file, rename it over the old) changes the stamp."""
    path = tmp_path / "config.yaml"
    _write(path, "a: 1\n")
    before = file_stamp(path)
    _write(tmp_path / ".config.yaml.swp", "a: 2\n")
    os.replace(tmp_path / ".config.yaml.swp", path)
    assert file_stamp(path) != before
    path.unlink()
    assert file_stamp(path) is None


TOKENIZER_CASES = [
    # (models.tiny, expected error or warning fragment, is an error)
    (
        {"tokenizer": "/nonexistent/tok", "token_source": "local"},
        "models.tiny.tokenizer (line 4): /nonexistent/tok is not a readable folder",
        True,
    ),
    (
        {"token_source": "local"},
        "models.tiny.token_source (line 4): token_source local needs a tokenizer folder",
        True,
    ),
    (
        {"tokenizer": str(MODEL_DIR), "chat_template": "/nonexistent/t.jinja"},
        "models.tiny.chat_template (line 5): cannot read the chat template",
        True,
    ),
    (
        {"tokenizer": "/nonexistent/tok"},
        "models.tiny.tokenizer: /nonexistent/tok is not a readable folder; the engine's",
        False,
    ),
]


@pytest.mark.parametrize(("entry", "message", "is_error"), TOKENIZER_CASES)
def test_snapshot_checks_the_files_a_policy_names(
    tmp_path: Path, entry: dict[str, str], message: str, is_error: bool
) -> None:
    """Tokenizer folders and chat templates are read when a snapshot is made: a bad one
    is an error naming the key and its line (a warning when `auto` can fall back)."""
    lines = ["models:", "  tiny:", "    default_max_tokens: 5"]
    lines += [f"    {key}: {value}" for key, value in entry.items()]
    path = tmp_path / "config.yaml"
    _write(path, "\n".join(lines) + "\n")
    if is_error:
        with pytest.raises(ConfigError) as info:
            load_snapshot(path, TokenCounters(None))
        assert message in str(info.value)
        assert str(info.value).startswith(f"{path}: invalid configuration")
    else:
        snapshot = load_snapshot(path, TokenCounters(None))
        assert any(message in w for w in snapshot.warnings), snapshot.warnings


def test_snapshot_loads_the_tokenizer_ahead(tmp_path: Path) -> None:
    """A valid snapshot carries a loaded local counter per model, and for a served model the
    file does not name (the defaults' counter)."""
    path = tmp_path / "config.yaml"
    _write(
        path, f"defaults:\n  tokenizer: {MODEL_DIR}\nmodels:\n  tiny:\n    token_source: local\n"
    )
    snapshot = load_snapshot(path, TokenCounters(None), served=["tiny", "other"])
    assert set(snapshot.counters) == {"tiny", "other"}
    assert all(counter.source == "local" for _, counter in snapshot.counters.values())
    assert snapshot.warnings == ()
