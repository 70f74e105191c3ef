"""The supervisor's decisions (engine/detect.py) as tables: restart back-off and giving up,
wedge detection, Retry-After, and reading /v1/models and /metrics."""

from __future__ import annotations

import pytest

from engine.detect import (
    backoff_delay,
    decide_wedge,
    parse_counters,
    parse_models,
    retry_after,
    should_give_up,
)


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [
        (1, 1.0),
        (2, 2.0),
        (3, 4.0),
        (5, 16.0),
        (6, 30.0),
        (1000, 30.0),
        (0, 1.0),
    ],
)
def test_backoff_delay(attempt: int, expected: float) -> None:
    """Restart delays double from the base and stop at the maximum."""
    assert backoff_delay(attempt, 1.0, 30.0) == expected


@pytest.mark.parametrize(
    ("times", "now", "expected"),
    [
        ([], 100.0, False),
        ([90.0, 95.0], 100.0, False),
        ([90.0, 95.0, 99.0], 100.0, True),
        ([10.0, 20.0, 99.0], 100.0, False),  # two of three are outside the window
        ([41.0, 50.0, 60.0], 100.0, True),
        ([40.0, 50.0, 60.0], 100.0, False),  # exactly a window ago is outside it
    ],
)
def test_should_give_up(times: list[float], now: float, expected: bool) -> None:
    """Give up once `max_restarts` (3) restarts happened within the window (60 s)."""
    assert should_give_up(times, now, 3, 60.0) is expected


@pytest.mark.parametrize(
    ("stalled", "quiet", "cleared", "expected"),
    [
        (None, 100.0, None, False),  # nothing in flight: nothing to be wedged on
        (30.0, 100.0, None, False),  # a stall shorter than the timeout
        (100.0, 5.0, None, False),  # busy: tokens moved recently
        (100.0, 61.0, None, True),  # no bytes and no tokens
        (100.0, None, None, True),  # no /metrics: the stall alone decides
        (100.0, 100.0, 10.0, False),  # a probe answered recently
        (100.0, 100.0, 61.0, True),  # ... but long ago
        (60.0, 100.0, None, False),  # exactly the timeout is still patience
    ],
)
def test_decide_wedge(
    stalled: float | None, quiet: float | None, cleared: float | None, expected: bool
) -> None:
    """A wedge is suspected only when bytes and token counters both stand still past the
    timeout (60 s), and no probe generation answered within it."""
    assert decide_wedge(stalled, quiet, cleared, 60.0) is expected


@pytest.mark.parametrize(
    ("ready_at", "now", "expected"),
    [
        (None, 5.0, 30.0),
        (20.0, 5.0, 15.0),
        (5.5, 5.0, 1.0),
        (1.0, 5.0, 1.0),
    ],
)
def test_retry_after(ready_at: float | None, now: float, expected: float) -> None:
    """Retry-After is the time left until the engine is expected ready, at least 1 s, and the
    configured guess when nothing is expected."""
    assert retry_after(ready_at, now, 30.0) == expected


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            {"data": [{"id": "a", "max_model_len": 512}, {"id": "l", "parent": "a"}]},
            {"a": 512, "l": 512},
        ),
        (
            {
                "data": [
                    {"id": "a", "max_model_len": 512},
                    {"id": "b", "max_model_len": 2048},
                    {"id": "l", "parent": "b", "max_model_len": None},
                ]
            },
            {"a": 512, "b": 2048, "l": 2048},
        ),
        (
            {"data": [{"id": "a", "max_model_len": 512}, {"id": "l", "parent": "gone"}]},
            {"a": 512, "l": 512},
        ),
        ({"data": [{"id": "a"}]}, {}),
        ({"data": [{"no": "id"}, "junk", {"id": "a", "max_model_len": True}]}, {}),
        ({"object": "error"}, {}),
        ([], {}),
    ],
)
def test_parse_models(payload: object, expected: dict[str, int]) -> None:
    """Model ids map to max_model_len; LoRA adapters (listed without one) take their parent's."""
    assert parse_models(payload) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('vllm:generation_tokens_total{engine="0",model_name="m"} 12.0\n', 12.0),
        (
            'vllm:generation_tokens_total{engine="0"} 2.0\n'
            'vllm:generation_tokens_total{engine="1"} 3.0\n'
            'vllm:prompt_tokens_total{engine="0"} 5.0\n',
            10.0,
        ),
        ('vllm:generation_tokens_total{model_name="a b} c"} 7.0 1700000000\n', 7.0),
        ("vllm:generation_tokens_total 4\n", 4.0),
        (
            "# TYPE vllm:generation_tokens_total counter\n"
            'vllm:generation_tokens_created{x="1"} 1.7e9\n'
            'vllm:num_requests_running{x="1"} 3.0\n',
            None,
        ),
        ("", None),
        ("vllm:generation_tokens_total{broken\n", None),
    ],
)
def test_parse_counters(text: str, expected: float | None) -> None:
    """The token counters are summed over all their samples; other series are ignored."""
    assert parse_counters(text) == expected
