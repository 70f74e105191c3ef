"""The cyclic collector as `vllm-guard run` sets it (gateway.serve.tune_collector): a
request's worth of objects freed by reference counting never triggers a collection, while
garbage in reference cycles is still collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.serve import GC_YOUNG_THRESHOLD, tune_collector


@pytest.fixture
def collector() -> Iterator[list[int]]:
    """Collections seen (their generations) while the test runs; thresholds restored after."""
    seen: list[int] = []

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            seen.append(info["generation"])

    saved = gc.get_threshold()
    gc.collect()
    gc.callbacks.append(callback)
    try:
        yield seen
    finally:
        gc.callbacks.remove(callback)
        gc.set_threshold(*saved)


def _requests_in_flight(n: int) -> None:
    """`n` request-shaped object graphs alive at once (a parsed body, a record, and some
    thirty more containers: about what aiohttp and admission allocate for one request), then
    all freed by reference counting, as 64 concurrent requests are."""
    alive = [
        {
            "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            "record": {"fields": {}, "headers": [["a", "b"]] * 4},
            "others": [{"n": i} for i in range(30)],
        }
        for _ in range(n)
    ]
    del alive


def test_requests_freed_by_refcount_trigger_no_collection(collector: list[int]) -> None:
    """With Python's default threshold, 64 requests' objects in flight trigger collections;
    once tuned, none (the older generations keep their thresholds)."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(700, older, oldest)
    for _ in range(20):
        _requests_in_flight(64)
    assert collector, "the default threshold should have collected"
    collector.clear()
    tune_collector()
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, older, oldest)
    for _ in range(20):
        _requests_in_flight(64)
    assert collector == []


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_garbage_in_cycles_is_still_collected(collector: list[int]) -> None:
    """Reference cycles made after tuning are freed by the collector on its own, once enough
    of them accumulate."""
    tune_collector()
    first = _Node()
    first.other = _Node()
    first.other.other = first
    watch = weakref.ref(first)
    del first
    for _ in range(GC_YOUNG_THRESHOLD):  # more cycles: the threshold is passed
        node = _Node()
        node.other = node
    del node
    assert watch() is None
    assert collector
