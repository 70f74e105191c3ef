"""Failure isolation: blame the request, not the host.

When the engine fails, every request in flight becomes a suspect, known by its fingerprint.
A suspect is replayed alone (probation): if the engine dies while it runs alone, it is the
culprit and is quarantined; if it answers, it is innocent. A fingerprint that was in flight at
`suspect_failures` failures is quarantined even when probation could not single it out.

The classes here hold state and change it only through their methods; they do no I/O and
take the clock as an argument, so they are tested without a server.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple


def fingerprint(body: Mapping[str, Any], ignore: frozenset[str]) -> str:
    """A hash of the client's body without the fields that vary between retries of the same
    request (`isolation.fingerprint_ignore`: user, stream, stream_options, request ids, ...).
    Keys are sorted, so the same request in another key order has the same fingerprint."""
    kept = {k: v for k, v in body.items() if k not in ignore}
    canonical = json.dumps(
        kept, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True
    )
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class QuarantineEntry:
    fingerprint: str
    model: str | None
    since: float
    """Wall-clock seconds (time.time) when it was quarantined."""
    until: float
    reason: str
    failures: int

    def public(self) -> dict[str, Any]:
        """What the operator sees: never the prompt text."""
        return {
            "fingerprint": self.fingerprint,
            "model": self.model,
            "since": self.since,
            "until": self.until,
            "reason": self.reason,
            "failures": self.failures,
        }


class Quarantine:
    """Fingerprints answered at once without reaching the engine. Entries expire after
    `ttl_s`; at most `max_entries` are kept (the oldest goes first)."""

    def __init__(self, ttl_s: float, max_entries: int) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[str, QuarantineEntry] = OrderedDict()
        self.added = 0
        """Entries added so far (read by the metrics)."""
        self.expired = 0
        """Entries dropped because they expired or the oldest went for a new one."""

    def add(
        self, fp: str, model: str | None, reason: str, failures: int, now: float
    ) -> QuarantineEntry:
        entry = QuarantineEntry(fp, model, now, now + self.ttl_s, reason, failures)
        self._entries.pop(fp, None)
        self._entries[fp] = entry
        self.added += 1
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.expired += 1
        return entry

    def get(self, fp: str, now: float) -> QuarantineEntry | None:
        entry = self._entries.get(fp)
        if entry is not None and entry.until <= now:
            del self._entries[fp]
            self.expired += 1
            return None
        return entry

    def entries(self, now: float) -> list[QuarantineEntry]:
        for fp in [fp for fp, e in self._entries.items() if e.until <= now]:
            del self._entries[fp]
            self.expired += 1
        return list(self._entries.values())

    def remove(self, fp: str) -> bool:
        return self._entries.pop(fp, None) is not None

    def clear(self) -> int:
        count = len(self._entries)
        self._entries.clear()
        return count


@dataclass(slots=True)
class Suspect:
    fingerprint: str
    model: str | None
    failures: int
    last_failure: float


class SuspectBook:
    """Fingerprints that were in flight when the engine failed, awaiting a verdict."""

    def __init__(self, ttl_s: float, max_entries: int) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._suspects: OrderedDict[str, Suspect] = OrderedDict()

    def charge(self, fp: str, model: str | None, now: float) -> Suspect:
        """One more engine failure with `fp` in flight."""
        suspect = self._suspects.pop(fp, None)
        if suspect is None or now - suspect.last_failure > self.ttl_s:
            suspect = Suspect(fp, model, 0, now)
        suspect.failures += 1
        suspect.last_failure = now
        self._suspects[fp] = suspect
        while len(self._suspects) > self.max_entries:
            self._suspects.popitem(last=False)
        return suspect

    def is_suspect(self, fp: str, now: float) -> bool:
        suspect = self._suspects.get(fp)
        if suspect is None:
            return False
        if now - suspect.last_failure > self.ttl_s:
            del self._suspects[fp]
            return False
        return True

    def acquit(self, fp: str) -> None:
        self._suspects.pop(fp, None)

    def entries(self, now: float) -> list[Suspect]:
        """The suspects whose suspicion has not faded, oldest first (for the operator)."""
        for fp in [fp for fp, s in self._suspects.items() if now - s.last_failure > self.ttl_s]:
            del self._suspects[fp]
        return list(self._suspects.values())

    def __len__(self) -> int:
        return len(self._suspects)


class InFlightRequest(NamedTuple):
    """A request that was in flight when the engine failed."""

    fingerprint: str
    model: str | None
    solo: bool
    """It ran alone on probation."""


class Culprit(NamedTuple):
    """A fingerprint to quarantine, and why."""

    fingerprint: str
    model: str | None
    failures: int
    """Engine failures it was in flight at."""
    reason: str


@dataclass(frozen=True, slots=True)
class Verdict:
    quarantine: tuple[Culprit, ...]
    suspects: tuple[str, ...]
    """Fingerprints charged, not (yet) quarantined."""


def attribute_failure(
    in_flight: Iterable[InFlightRequest],
    book: SuspectBook,
    suspect_failures: int,
    now: float,
) -> Verdict:
    """Blame the requests in flight when the engine failed: a request that ran alone on
    probation is the culprit outright; otherwise each is charged one failure and quarantined
    once it has been in flight at `suspect_failures` failures."""
    entries = list(in_flight)
    solo = [e for e in entries if e.solo]
    if solo:
        return Verdict(
            tuple(
                Culprit(
                    e.fingerprint,
                    e.model,
                    book.charge(e.fingerprint, e.model, now).failures,
                    "the engine failed while this request ran alone on probation",
                )
                for e in solo
            ),
            (),
        )
    quarantine: list[Culprit] = []
    suspects: list[str] = []
    seen: set[str] = set()
    for e in entries:
        if e.fingerprint in seen:
            continue
        seen.add(e.fingerprint)
        suspect = book.charge(e.fingerprint, e.model, now)
        if suspect.failures >= suspect_failures:
            quarantine.append(
                Culprit(
                    e.fingerprint,
                    e.model,
                    suspect.failures,
                    f"in flight at {suspect.failures} engine failures",
                )
            )
        else:
            suspects.append(e.fingerprint)
    return Verdict(tuple(quarantine), tuple(suspects))
