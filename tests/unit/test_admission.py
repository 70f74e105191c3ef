"""The gate alone, with a fake engine supervisor: queue bounds, probation order, blame."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from engine.settings import EngineConfig
from engine.state import EngineState, StateChange
from gateway.admission import Gate
from gateway.config import IsolationConfig
from gateway.errors import EngineUnavailable, Overloaded, Quarantined
from gateway.inflight import InflightLedger


class FakeSupervisor:
    """An engine whose state the test sets."""

    def __init__(self, *, ready: bool = True, restart: bool = True) -> None:
        self.state = EngineState.READY if ready else EngineState.RESTARTING
        self.epoch = 1
        self.restart = restart
        self.supervised = True
        self.subscribers: list[Callable[[StateChange], None]] = []

    def is_ready(self) -> bool:
        return self.state is EngineState.READY

    def restart_expected(self) -> bool:
        return self.restart

    def retry_after_s(self) -> float:
        return 7.0

    def subscribe(self, callback: Callable[[StateChange], None]) -> None:
        self.subscribers.append(callback)

    def report_engine_failure(self, reason: str) -> None:
        pass

    async def settle(self, suspicion: str) -> bool:
        return self.is_ready()

    def become(self, state: EngineState) -> None:
        old, self.state = self.state, state
        if state is EngineState.READY:
            self.epoch += 1
        for callback in self.subscribers:
            callback(StateChange(old, state, "test", self.epoch))


START = 1000.0


class FakeClock:
    """The gate's monotonic clock, moved by the test. A waiting request reads it each time it
    checks its bounds, so `read()` tells the test that a request has been refused and is
    waiting: events are ordered by it, not by sleeping."""

    def __init__(self) -> None:
        self.now = START
        self._read = asyncio.Event()

    def __call__(self) -> float:
        self._read.set()
        return self.now

    async def read(self, timeout: float = 10.0) -> None:
        """Wait until the clock is next read."""
        self._read.clear()
        await asyncio.wait_for(self._read.wait(), timeout)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _gate(
    fake: FakeSupervisor,
    supervised: bool = True,
    clock: FakeClock | None = None,
    **isolation: float,
) -> Gate:
    engine = EngineConfig(command=("engine",) if supervised else None)
    fake.supervised = supervised
    return Gate(
        IsolationConfig(**isolation), fake, InflightLedger(), engine, clock=clock or FakeClock()
    )


def _deadline(seconds: float = 10) -> float:
    """A deadline `seconds` after the fake clock's start."""
    return START + seconds


async def test_bulkhead_queue_then_429(clock: FakeClock) -> None:
    """Past max_in_flight requests wait; past queue_max they get 429 with Retry-After."""
    gate = _gate(FakeSupervisor(), clock=clock, queue_max=1, queue_timeout_s=5)
    first = await gate.enter("a", "m", "fa", 1, _deadline())
    waiter = asyncio.ensure_future(gate.enter("b", "m", "fb", 1, _deadline()))
    await clock.read()
    with pytest.raises(Overloaded) as info:
        await gate.enter("c", "m", "fc", 1, _deadline())
    assert info.value.headers["Retry-After"]
    assert not waiter.done()
    gate.leave(first, answered=True)
    second = await asyncio.wait_for(waiter, 5)
    assert second.fingerprint == "fb"


async def test_no_restart_coming_means_503_at_once() -> None:
    """An engine that is down with no restart coming (sidecar, or given up) is 503 at once,
    with the supervisor's Retry-After."""
    gate = _gate(FakeSupervisor(ready=False, restart=False), supervised=False)
    with pytest.raises(EngineUnavailable) as info:
        await asyncio.wait_for(gate.enter("a", "m", "f", 4, _deadline()), 1)
    assert info.value.headers["Retry-After"] == "7"


async def test_held_while_restarting_then_admitted(clock: FakeClock) -> None:
    """A supervised engine that restarts holds requests, which go once it is ready."""
    fake = FakeSupervisor(ready=False)
    gate = _gate(fake, clock=clock)
    waiter = asyncio.ensure_future(gate.enter("a", "m", "f", 4, _deadline()))
    await clock.read()
    assert not waiter.done()
    fake.become(EngineState.READY)
    ticket = await asyncio.wait_for(waiter, 5)
    assert not ticket.solo


async def test_failure_makes_suspects_that_run_alone_and_nothing_overtakes_them(
    clock: FakeClock,
) -> None:
    """Requests in flight at a failure become suspects; after the restart a suspect runs
    alone, fresh requests wait behind it, and its answer acquits it."""
    fake = FakeSupervisor()
    gate = _gate(fake, clock=clock)
    a = await gate.enter("1", "m", "fa", 8, _deadline())
    b = await gate.enter("2", "m", "fb", 8, _deadline())
    fake.become(EngineState.FAILED)
    assert a.engine_failed
    assert b.engine_failed
    gate.leave(a, answered=False)
    gate.leave(b, answered=False)
    fake.become(EngineState.READY)
    solo = await gate.enter("1", "m", "fa", 8, _deadline())
    assert solo.solo
    other_suspect = asyncio.ensure_future(gate.enter("2", "m", "fb", 8, _deadline()))
    await clock.read()
    fresh = asyncio.ensure_future(gate.enter("3", "m", "fresh", 8, _deadline()))
    await clock.read()
    assert not other_suspect.done()
    assert not fresh.done()
    gate.leave(solo, answered=True)
    assert not gate.suspects.is_suspect("fa", time.time())
    second = await asyncio.wait_for(other_suspect, 5)
    assert second.solo
    await clock.read()  # fresh checked again, and was held back
    assert not fresh.done()
    gate.leave(second, answered=True)
    assert not (await asyncio.wait_for(fresh, 5)).solo


async def test_death_during_a_solo_run_quarantines_the_culprit() -> None:
    """The engine failing while a suspect runs alone quarantines it: copies get 422."""
    fake = FakeSupervisor()
    gate = _gate(fake)
    ticket = await gate.enter("1", "m", "poison", 8, _deadline())
    fake.become(EngineState.FAILED)
    gate.leave(ticket, answered=False)
    fake.become(EngineState.READY)
    solo = await gate.enter("1", "m", "poison", 8, _deadline())
    assert solo.solo
    fake.become(EngineState.FAILED)
    gate.leave(solo, answered=False)
    fake.become(EngineState.READY)
    with pytest.raises(Quarantined) as info:
        await gate.enter("2", "m", "poison", 8, _deadline())
    assert "quarantined" in info.value.message
    assert [e.fingerprint for e in gate.quarantine.entries(time.time())] == ["poison"]


async def test_waiting_for_a_restart_is_bounded_by_queue_timeout(clock: FakeClock) -> None:
    """A request held for an engine that does not come back gets 503 at queue_timeout_s,
    well before its own deadline."""
    gate = _gate(FakeSupervisor(ready=False), clock=clock, queue_timeout_s=2)
    waiter = asyncio.ensure_future(gate.enter("1", "m", "fresh", 8, _deadline(60)))
    await clock.read()
    clock.now = START + 1.99  # just short of queue_timeout_s: still held
    await clock.read()  # the waiter checks its bounds at least once a second
    assert not waiter.done()
    clock.now = START + 2.0  # queue_timeout_s, 58 s before the request's deadline
    with pytest.raises(EngineUnavailable) as info:
        await asyncio.wait_for(waiter, 5)
    assert "waited as long as it may" in info.value.message
    assert info.value.headers["Retry-After"] == "7"


async def test_a_copy_waiting_behind_an_acquitted_suspect_goes_on(clock: FakeClock) -> None:
    """Two copies of a suspect: the first runs alone and answers; the second, no longer a
    suspect, is admitted at once rather than left waiting behind its own suspicion."""
    fake = FakeSupervisor()
    gate = _gate(fake, clock=clock, queue_timeout_s=30)
    ticket = await gate.enter("1", "m", "fp", 8, _deadline())
    fake.become(EngineState.FAILED)
    gate.leave(ticket, answered=False)
    fake.become(EngineState.READY)
    first = await gate.enter("1", "m", "fp", 8, _deadline())
    copy = asyncio.ensure_future(gate.enter("2", "m", "fp", 8, _deadline()))
    await clock.read()
    assert not copy.done()
    gate.leave(first, answered=True)
    second = await asyncio.wait_for(copy, 5)
    assert not second.solo
    fresh = await asyncio.wait_for(gate.enter("3", "m", "other", 8, _deadline()), 5)
    assert not fresh.solo
