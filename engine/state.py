"""The engine's state as the gateway sees it: the state and its epoch, whether the engine is
live, why it is not ready; subscribers told of each change, synchronously; waiting for one.

`engine.supervisor.EngineSupervisor` is a `StateKeeper` and the only one to change the state
(`_transition`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import structlog

logger = structlog.get_logger("engine.supervisor")  # the supervisor's lines


class EngineState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"
    RESTARTING = "restarting"
    GIVEN_UP = "given_up"
    STOPPED = "stopped"


@dataclass(frozen=True)
class StateChange:
    old: EngineState
    new: EngineState
    reason: str
    epoch: int


class StateKeeper:
    """The engine's state, what the gateway reads of it and how it is told of changes. Methods
    are called on the event loop's thread."""

    def __init__(self) -> None:
        self._state = EngineState.STOPPED
        self._epoch = 0
        self._why_not_ready: str | None = "not started"
        self._live = True
        self._subscribers: list[Callable[[StateChange], None]] = []
        self._changed = asyncio.Event()

    # What the gateway reads.

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def epoch(self) -> int:
        """Incremented each time the engine becomes ready after a start or restart."""
        return self._epoch

    @property
    def not_ready_reason(self) -> str | None:
        """Why the engine is not ready (the failure, then the last failed probe's reason:
        "probe generation: 404 on /v1/completions"); None while ready."""
        return None if self.is_ready() else self._why_not_ready

    def is_ready(self) -> bool:
        return self._state is EngineState.READY

    def live(self) -> bool:
        """False once the engine has been seen dead or wedged, until it is ready again."""
        return self._live

    def restart_expected(self) -> bool:
        """Whether the engine is expected back (restarted by us or by the kubelet)."""
        return self._state not in {EngineState.GIVEN_UP, EngineState.STOPPED}

    async def wait_ready(self, timeout: float) -> bool:
        """Wait up to `timeout` for READY; False at once if the engine is given up or stopped."""
        return (
            await self._wait_until(lambda: self.is_ready() or not self.restart_expected(), timeout)
            and self.is_ready()
        )

    def subscribe(self, callback: Callable[[StateChange], None]) -> None:
        """Call `callback` synchronously on each state change."""
        self._subscribers.append(callback)

    def _transition(self, new: EngineState, reason: str) -> None:
        old, self._state = self._state, new
        if new is EngineState.READY:
            self._live = True
        elif new in {EngineState.FAILED, EngineState.GIVEN_UP}:
            self._live = False
        if new is not EngineState.READY and (old in _LEFT or new in _FAILED):
            self._why_not_ready = reason
        logger.info(
            "engine_state", **{"from": old.value, "to": new.value}, reason=reason, epoch=self._epoch
        )
        change = StateChange(old, new, reason, self._epoch)
        for callback in list(self._subscribers):
            try:
                callback(change)
            except Exception:  # one subscriber's bug must not stop supervision
                logger.exception("engine_state_subscriber_error", callback=repr(callback))
        self._changed.set()
        self._changed = asyncio.Event()

    def _note(self, reason: str) -> None:
        """Why the engine is still not ready, once per new reason: an `engine_state` line whose
        state did not change (subscribers are not told: nothing changed for them)."""
        state = self._state.value
        logger.info(
            "engine_state", **{"from": state, "to": state}, reason=reason, epoch=self._epoch
        )

    async def _wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not condition():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return True


_LEFT = frozenset({EngineState.READY, EngineState.STOPPED})
_FAILED = frozenset({EngineState.FAILED, EngineState.GIVEN_UP, EngineState.STOPPED})
"""A transition out of ready or stopped, or into a failed state, says why the engine is not
ready; restarting and starting after a failure keep the failure's reason until a probe says
more."""
