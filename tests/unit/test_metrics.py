"""The metrics' pure parts: which cause a supervisor's failure reason counts under, where an
answer's usage is read, the action labels, and that every catalogued family is declared."""

from __future__ import annotations

import json

import pytest

from engine.state import EngineState, StateChange
from gateway.config import ConfigError, parse_config
from gateway.metrics import Metrics, action_label, failure_cause, usage_of
from gateway.policy import Action
from tests.helpers import ROOT


@pytest.mark.parametrize(
    ("reason", "cause"),
    [
        ("engine exited with status -9 (SIGKILL) while ready", "exit"),
        ("cannot start the engine: [Errno 2] No such file", "exit"),
        ("/health failed 3 probes in a row (last: HTTP 503)", "health"),
        ("wedged: no bytes to in-flight requests for 31s, ...", "wedge"),
        ("the engine restarted without the gateway seeing it (new start time)", "unseen_restart"),
        ("not ready within 600s (last probe: /health: HTTP 503)", "probe"),
        ("restart requested: operator", None),
    ],
)
def test_failure_cause(reason: str, cause: str | None) -> None:
    """Each failure reason the supervisor gives maps to its closed cause; an operator's
    restart is no failure."""
    assert failure_cause(reason) == cause


def _sse(*events: object) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)


@pytest.mark.parametrize(
    ("raw", "usage"),
    [
        (
            json.dumps({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}),
            (7, 3),
        ),
        (json.dumps({"usage": {"prompt_tokens": 7, "completion_tokens": 3}, "x": 1}), (7, 3)),
        (json.dumps({"choices": [{"text": 'say "usage": {'}]}), None),
        (json.dumps({"usage": None}), None),
        (json.dumps({"usage": {"prompt_tokens": "7", "completion_tokens": 3}}), None),
        (
            _sse(
                {"usage": {"prompt_tokens": 1, "completion_tokens": 1}},
                {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9}},
            ).decode()
            + "data: [DONE]\n\n",
            (5, 9),
        ),
        (
            _sse({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9}})[
                :-20
            ].decode(),
            None,
        ),
        ("", None),
    ],
)
def test_usage_of(raw: str, usage: tuple[int, int] | None) -> None:
    """The last usage object of a JSON answer or of a stream's end is read; text that only
    looks like one, a null or a cut one is none."""
    assert usage_of(raw.encode()) == usage


def test_action_labels_are_the_catalogued_values() -> None:
    """Every policy action maps to a label value of the catalogue (underscores, no hyphen)."""
    assert {action_label(a.value) for a in Action} == {
        "kept",
        "defaulted",
        "clamped",
        "would_clamp",
        "would_reject",
    }


def test_every_family_is_declared_before_any_event() -> None:
    """A fresh registry declares exactly the families docs/metrics.md lists, with their
    types (the shared store's only once registered); a model name outside config and the
    engine's list is unknown."""
    config = parse_config({"models": {"a": {}}})
    metrics = Metrics(lambda: (config, {"b": 100}))
    assert _declared(metrics) == {n: t for n, t in _documented().items() if n != SHARED}
    metrics.watch_shared_store(lambda: True)
    assert _declared(metrics) == _documented()
    assert [metrics.model_label(m) for m in ("a", "b", "c", None)] == [
        "a",
        "b",
        "unknown",
        "unknown",
    ]


SHARED = "vllm_guard_shared_store_up"


def _declared(metrics: Metrics) -> dict[str, str]:
    """Family names and types from the `# TYPE` lines, without prometheus-client's
    `_created` gauges."""
    types = {}
    for line in metrics.exposition().decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
    return {
        name: kind
        for name, kind in types.items()
        if not (
            name.endswith("_created")
            and (
                types.get(name.removesuffix("_created") + "_total") == "counter"
                or types.get(name.removesuffix("_created")) == "histogram"
            )
        )
    }


def _documented() -> dict[str, str]:
    """docs/metrics.md's table: name to type."""
    out = {}
    for line in (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("vllm_guard_"):
            out[cells[0]] = cells[1]
    return out


def test_start_duration_and_restarts_from_state_changes() -> None:
    """A restart is counted when a supervised engine is spawned again or a sidecar engine is
    seen back; the start's duration runs from starting (or restarting) to ready."""
    config = parse_config({})
    metrics = Metrics(lambda: (config, {}))
    clock = iter([10.0, 12.5, 20.0, 21.0])
    metrics._clock = lambda: next(clock)
    s = EngineState
    for old, new in [
        (s.STOPPED, s.STARTING),
        (s.STARTING, s.READY),
        (s.READY, s.FAILED),
        (s.FAILED, s.RESTARTING),
        (s.RESTARTING, s.READY),  # sidecar: seen back
    ]:
        reason = "engine exited with status 1 while ready" if new is s.FAILED else ""
        metrics.engine_changed(StateChange(old, new, reason, 0))
    assert metrics.engine_restarts._value.get() == 1
    assert metrics.engine_last_start._value.get() == 1.0
    assert metrics.engine_failures.labels("exit")._value.get() == 1


def test_metrics_on_the_admin_listener_need_it() -> None:
    """metrics.listener admin with the admin listener off is a config error naming the key."""
    with pytest.raises(ConfigError, match=r"metrics\.listener is admin"):
        parse_config({"admin": {"enabled": False}, "metrics": {"listener": "admin"}})
    parse_config({"admin": {"enabled": False}, "metrics": {"enabled": False, "listener": "admin"}})
