"""What the operator sees of the engine: its recent state changes with their reasons, and the
version it reports.

`EngineHistory` subscribes to the supervisor before it starts, so the first change is kept.
On each return to ready it asks the engine's `GET /version` once, logs it, and warns when it is
outside the versions this gateway was tested against.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from engine.state import EngineState, StateChange

log = structlog.get_logger("gateway.engine")

TESTED_VERSIONS: tuple[str, ...] = ("0.32.",)
"""vLLM releases this gateway's tests ran against (prefixes: 0.32.x)."""

HISTORY = 50

Ask = Callable[[], Awaitable[object]]
"""GET /version of the engine: its JSON answer."""


def version_tested(version: str) -> bool:
    """Whether a vLLM version string is one the gateway was tested against (a local build's
    suffix, as in 0.32.0+cpu, is part of the same release)."""
    return version.startswith(TESTED_VERSIONS)


@dataclass(frozen=True, slots=True)
class Change:
    at: float
    """Wall-clock seconds."""
    old: str
    new: str
    reason: str
    epoch: int

    def public(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "from": self.old,
            "to": self.new,
            "reason": self.reason,
            "epoch": self.epoch,
        }


class EngineHistory:
    """The last `HISTORY` state changes, and the engine's version as last read."""

    def __init__(
        self,
        ask_version: Ask | None = None,
        *,
        wall_clock: Callable[[], float] = time.time,
        size: int = HISTORY,
    ) -> None:
        self.changes: deque[Change] = deque(maxlen=size)
        self.version: str | None = None
        self.restarts_since_reload = 0
        self._ask_version = ask_version
        self._wall_clock = wall_clock
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, change: StateChange) -> None:
        self.changes.append(
            Change(
                self._wall_clock(), change.old.value, change.new.value, change.reason, change.epoch
            )
        )
        if change.new is EngineState.READY and self._ask_version is not None:
            task = asyncio.get_running_loop().create_task(self._read_version(self._ask_version))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _read_version(self, ask: Ask) -> None:
        try:
            answer = await ask()
        except Exception as err:  # noqa: BLE001 - any failure only means the version is unknown
            log.warning("engine_version_unknown", detail=f"{type(err).__name__}: {err}")
            return
        version = answer.get("version") if isinstance(answer, dict) else None
        if not isinstance(version, str):
            log.warning("engine_version_unknown", detail="GET /version gave no version")
            return
        if version == self.version:
            return
        self.version = version
        if version_tested(version):
            log.info("engine_version", version=version)
        else:
            log.warning(
                "engine_version_untested",
                version=version,
                tested=[f"{p}x" for p in TESTED_VERSIONS],
            )

    def public(self) -> list[dict[str, Any]]:
        return [c.public() for c in reversed(self.changes)]

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
