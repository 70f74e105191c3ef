"""The ledger of generation requests in flight to the engine.

It is the gateway's view of progress: when each request last received a byte from the engine.
The engine supervisor reads it (as its `ProgressSource`) to tell a wedged engine from a busy
one; failure isolation reads it to know which requests were in flight when the engine died.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass(slots=True, eq=False)
class Inflight:
    """One request's attempt at the engine."""

    request_id: str
    model: str | None
    fingerprint: str
    solo: bool
    """Running alone on probation."""
    started: float
    last_progress: float
    bytes_received: int = 0
    engine_failed: bool = field(default=False)
    """Set when the engine failed while this attempt was in flight."""


class InflightLedger:
    __slots__ = ("_clock", "_entries")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[int, Inflight] = {}

    def add(self, request_id: str, model: str | None, fingerprint: str, *, solo: bool) -> Inflight:
        now = self._clock()
        entry = Inflight(request_id, model, fingerprint, solo, now, now)
        self._entries[id(entry)] = entry
        return entry

    def progress(self, entry: Inflight, nbytes: int) -> None:
        entry.last_progress = self._clock()
        entry.bytes_received += nbytes

    def remove(self, entry: Inflight) -> None:
        self._entries.pop(id(entry), None)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Inflight]:
        return iter(list(self._entries.values()))

    def stalled_for(self, now: float) -> float | None:
        """Seconds since the most recent byte any in-flight request received, or None when
        nothing is in flight. A single moving request means the engine is making progress."""
        if not self._entries:
            return None
        latest = max(e.last_progress for e in self._entries.values())
        return max(0.0, now - latest)
