"""The gate in the sidecar shape: requests are held for the engine's return (the kubelet
restarts it) up to `engine.sidecar_hold_s` after it stopped being ready, then 503."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from engine.settings import EngineConfig
from engine.state import EngineState, StateChange
from gateway.admission import Gate
from gateway.config import IsolationConfig
from gateway.errors import EngineUnavailable
from gateway.inflight import InflightLedger


class SidecarEngine:
    """A sidecar engine whose state the test sets (the kubelet is expected to restart it)."""

    def __init__(self) -> None:
        self.state = EngineState.READY
        self.epoch = 1
        self.supervised = False
        self.subscribers: list[Callable[[StateChange], None]] = []

    def is_ready(self) -> bool:
        return self.state is EngineState.READY

    def restart_expected(self) -> bool:
        return True

    def retry_after_s(self) -> float:
        return 3.0

    def subscribe(self, callback: Callable[[StateChange], None]) -> None:
        self.subscribers.append(callback)

    def report_engine_failure(self, reason: str) -> None:
        pass

    async def settle(self, suspicion: str) -> bool:
        return self.is_ready()

    def become(self, state: EngineState) -> None:
        old, self.state = self.state, state
        for callback in self.subscribers:
            callback(StateChange(old, state, "test", 1))


def _gate(engine: SidecarEngine, hold_s: float) -> Gate:
    return Gate(
        IsolationConfig(queue_timeout_s=30),
        engine,
        InflightLedger(),
        EngineConfig(sidecar_hold_s=hold_s),
    )


def _deadline() -> float:
    return time.monotonic() + 60


async def test_held_until_the_engine_returns() -> None:
    """A request arriving while the sidecar engine is down waits and goes once it is ready
    again."""
    engine = SidecarEngine()
    gate = _gate(engine, hold_s=10)
    engine.become(EngineState.FAILED)
    engine.become(EngineState.RESTARTING)
    waiter = asyncio.ensure_future(gate.enter("a", "m", "f", 4, _deadline()))
    await asyncio.sleep(0.2)
    assert not waiter.done()
    engine.become(EngineState.READY)
    ticket = await asyncio.wait_for(waiter, 5)
    assert not ticket.solo


async def test_past_the_hold_the_answer_is_503() -> None:
    """A held request is answered 503 with Retry-After once the engine has been away for
    `sidecar_hold_s`, and a request arriving after that gets 503 at once."""
    engine = SidecarEngine()
    gate = _gate(engine, hold_s=0.3)
    engine.become(EngineState.FAILED)
    with pytest.raises(EngineUnavailable) as info:
        await asyncio.wait_for(gate.enter("a", "m", "f", 4, _deadline()), 10)
    assert info.value.headers["Retry-After"] == "3"
    with pytest.raises(EngineUnavailable, match=r"not back within 0\.3s"):
        await asyncio.wait_for(gate.enter("b", "m", "g", 4, _deadline()), 10)


async def test_a_zero_hold_answers_503_at_once() -> None:
    """`sidecar_hold_s: 0` keeps the old behaviour: a sidecar engine that is down means 503
    at once."""
    engine = SidecarEngine()
    gate = _gate(engine, hold_s=0)
    engine.become(EngineState.FAILED)
    with pytest.raises(EngineUnavailable):
        await asyncio.wait_for(gate.enter("a", "m", "f", 4, _deadline()), 1)


async def test_the_hold_restarts_with_each_failure() -> None:
    """The hold counts from the latest time the engine stopped being ready, not from the
    first failure."""
    engine = SidecarEngine()
    gate = _gate(engine, hold_s=0.5)
    engine.become(EngineState.FAILED)
    await asyncio.sleep(0.6)  # the first hold is over
    engine.become(EngineState.READY)
    engine.become(EngineState.FAILED)
    waiter = asyncio.ensure_future(gate.enter("a", "m", "f", 4, _deadline()))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    engine.become(EngineState.READY)
    await asyncio.wait_for(waiter, 5)
