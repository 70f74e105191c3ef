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
import math
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import orjson

FINGERPRINT_VERSION = 2
"""The rule `fingerprint` follows by default. Raised whenever the rule changes, so that a
quarantine shared between replicas keys its entries by version, and a replica in a rolling
upgrade can still compute the previous version's fingerprint to look them up."""


def fingerprint(
    body: Mapping[str, Any], ignore: frozenset[str], *, version: int = FINGERPRINT_VERSION
) -> str:
    """A hash of the client's body that is equal for two requests the quarantine treats as
    the same.

    Version 2 (the default): the same after dropping the fields that vary between retries
    (`isolation.fingerprint_ignore`: user, stream, stream_options, request ids, ...), with
    object keys in any order, members whose value is null left out (vLLM reads null as unset),
    a whole number the same however it is written (1, 1.0), and every string value compared
    with its whitespace trimmed at both ends and each inner run of whitespace (spaces, tabs,
    newlines, any Unicode space) read as one space. Everything else stays distinct: words,
    letter case, punctuation, the order of messages and of list items, roles, the model, and
    every parameter's value (max_tokens 20 and 21 differ).

    Version 1: the exact body without the ignored fields, keys sorted (kept for lookups of
    entries written by replicas that still run it)."""
    kept = body if ignore.isdisjoint(body) else {k: v for k, v in body.items() if k not in ignore}
    if version == 1:
        return _digest(b"", _canonical_std(kept))
    if version == 2:
        try:
            # Most bodies are in version 2's form already: written as they are, not copied.
            normalised = kept if _in_normal_form(kept) else _normalised(kept)
            canonical = orjson.dumps(normalised, option=orjson.OPT_SORT_KEYS)
        except (_OrjsonWritesOtherwise, orjson.JSONEncodeError):
            canonical = _canonical_std(_normalised(kept, strict=False))
        return _digest(b"v2\n", canonical)
    raise ValueError(f"unknown fingerprint version {version}")


def _digest(prefix: bytes, canonical: bytes) -> str:
    # Fed in two parts: the same digest, without a copy of the canonical form (megabytes for
    # a long prompt) to put the prefix before it.
    digest = hashlib.sha256(prefix)
    digest.update(canonical)
    return digest.hexdigest()[:32]


def _canonical_std(value: object) -> bytes:
    """The canonical JSON every version hashes: keys sorted, no spaces, text as UTF-8."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True
    ).encode("utf-8", "surrogatepass")


class _OrjsonWritesOtherwise(Exception):
    """A value orjson writes differently from `_canonical_std` (a float below 1e-4 in
    magnitude: `1e-05` against `0.00001`; NaN and the infinities, which orjson writes as
    null): that body is written by the standard library."""


_SMALL_FLOAT = 1e-4
"""Below this magnitude Python's repr writes a float with an exponent and orjson does not;
above it (and for integers up to 64 bits, strings, lists, objects) their canonical bytes are
equal (tests/unit/test_fingerprint.py checks it on random values). orjson refuses what it
cannot write the same way (integers past 64 bits, lone surrogates): those take the standard
library too."""


_OTHER_ASCII_SPACE = ("\t", "\n", "\x0b", "\x0c", "\r", "\x1c", "\x1d", "\x1e", "\x1f")
_OTHER_SPACE = (
    *_OTHER_ASCII_SPACE,
    *("\x85", "\xa0", "\u1680", "\u2028", "\u2029", "\u202f", "\u205f", "\u3000"),
    *(chr(c) for c in range(0x2000, 0x200B)),
)
"""Every character `str.isspace` accepts but the space (tests/unit/test_fingerprint.py checks
the list against Python's own)."""


_SCAN_ASCII_FROM, _SCAN_FROM = 128, 768
"""`str.isprintable` refuses every other space (all are control or separator characters:
tests/unit/test_fingerprint.py checks it), so one read of a text that it accepts shows there
is none. Below these lengths (ASCII text, other text) that read is cheaper than searching for
each other space in turn (9 or 28 scans at C speed, each a call); from them on, the text is
searched, as is any text it refuses."""


def _plain(text: str) -> bool:
    """Whether `text` is already in version 2's form (single spaces only, none at the ends): a
    few C-speed scans instead of splitting a long prompt into words."""
    if text[:1] == " " or text[-1:] == " ":
        return False
    ascii = text.isascii()
    if len(text) >= (_SCAN_ASCII_FROM if ascii else _SCAN_FROM) or not text.isprintable():
        # One character is found faster than two: a newline, the usual one, comes first.
        for c in _OTHER_ASCII_SPACE if ascii else _OTHER_SPACE:
            if c in text:
                return False
    return "  " not in text


_RUNS = re.compile(r"\s{2,}|[^\S ]")
r"""What version 2 reads as one space: a run of whitespace, or one whitespace that is not a
space (`\s` is exactly `str.isspace`, the set `str.split` splits on)."""
_SPLIT_BELOW = 65536
"""Shorter strings are normalised by split and join (fastest); longer ones by one regex pass,
which never holds a list of every word of a multi-megabyte prompt in memory."""


def _spaced(text: str) -> str:
    """`text` with its whitespace trimmed at both ends and each inner run read as one space."""
    if len(text) < _SPLIT_BELOW:
        return " ".join(text.split())
    return _RUNS.sub(" ", text).strip()


def _in_normal_form(value: object) -> bool:
    """Whether `_normalised(value)` would be `value` itself, equal in every part, with nothing
    orjson writes otherwise: every string plain, no member whose value is null, no whole or
    tiny float (nor NaN or an infinity), only the JSON types themselves (a subclass is left to
    `_normalised`). One walk, nothing copied; False sends the value to `_normalised`."""
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is str:
            if not _plain(item):
                return False
        elif type(item) is dict:
            members = item.values()
            if None in members:
                return False
            stack.extend(members)
        elif type(item) is list:
            stack.extend(item)
        elif type(item) is float:
            if item.is_integer() or not _SMALL_FLOAT <= abs(item) < math.inf:
                return False
        elif type(item) is not int and type(item) is not bool and item is not None:
            return False
    return True


def _normalised(value: object, *, strict: bool = True) -> object:
    """Version 2's reading of a JSON value (bodies nest at most 128 levels: checked before).
    `strict`: raise `_OrjsonWritesOtherwise` at a float orjson would write otherwise (what
    orjson cannot write at all, it refuses itself)."""
    if isinstance(value, str):
        return value if _plain(value) else _spaced(value)
    if isinstance(value, dict):
        return {k: _normalised(v, strict=strict) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_normalised(v, strict=strict) for v in value]
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        if strict and not _SMALL_FLOAT <= abs(value) < math.inf:
            raise _OrjsonWritesOtherwise  # also NaN and infinities (orjson writes null)
    return value


@dataclass(frozen=True, slots=True)
class QuarantineEntry:
    fingerprint: str
    model: str | None
    since: float
    """Wall-clock seconds (time.time) when it was quarantined."""
    until: float
    reason: str
    failures: int
    proven: bool = False
    """Found alone on probation: only such entries are shared with other replicas."""
    found_by: str | None = None
    """The replica that found it (set when replicas share a quarantine)."""

    def public(self) -> dict[str, Any]:
        """What the operator sees: never the prompt text."""
        return {
            "fingerprint": self.fingerprint,
            "model": self.model,
            "since": self.since,
            "until": self.until,
            "reason": self.reason,
            "failures": self.failures,
            "found_by": self.found_by,
        }


class QuarantineListener(Protocol):
    """Told of each change this replica makes to its quarantine (gateway.fleet shares them)."""

    def quarantined(self, entry: QuarantineEntry) -> None: ...
    def released(self, fp: str | None) -> None:
        """One fingerprint cleared, or all of them (None)."""


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
        self._listener: QuarantineListener | None = None
        self._replica: str | None = None

    def attach(self, listener: QuarantineListener, replica: str) -> None:
        """Tell `listener` of every add, remove and clear from now on; entries found here
        carry `replica`. Entries `load`ed and `forget`s are not told (they came from it)."""
        self._listener, self._replica = listener, replica

    def add(
        self,
        fp: str,
        model: str | None,
        reason: str,
        failures: int,
        now: float,
        *,
        proven: bool = False,
    ) -> QuarantineEntry:
        entry = QuarantineEntry(
            fp, model, now, now + self.ttl_s, reason, failures, proven, self._replica
        )
        self.load(entry)
        self.added += 1
        if self._listener is not None:
            self._listener.quarantined(entry)
        return entry

    def load(self, entry: QuarantineEntry) -> None:
        """Hold an entry made elsewhere (another replica's), as it is."""
        self._entries.pop(entry.fingerprint, None)
        self._entries[entry.fingerprint] = entry
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.expired += 1

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
        found = self._entries.pop(fp, None) is not None
        if self._listener is not None:  # told even when absent here: the fleet may hold it
            self._listener.released(fp)
        return found

    def clear(self) -> int:
        count = len(self._entries)
        self._entries.clear()
        if self._listener is not None:
            self._listener.released(None)
        return count

    def forget(self, fp: str | None) -> None:
        """Drop one entry, or all (None), released elsewhere."""
        if fp is None:
            self._entries.clear()
        else:
            self._entries.pop(fp, None)


@dataclass(slots=True)
class Suspect:
    fingerprint: str
    model: str | None
    failures: int
    last_failure: float


class SuspectListener(Protocol):
    """Told of each engine failure charged here (gateway.fleet counts them fleet-wide)."""

    def charged(self, fp: str, model: str | None) -> None: ...


class SuspectBook:
    """Fingerprints that were in flight when the engine failed, awaiting a verdict."""

    def __init__(self, ttl_s: float, max_entries: int) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._suspects: OrderedDict[str, Suspect] = OrderedDict()
        self._listener: SuspectListener | None = None

    def attach(self, listener: SuspectListener) -> None:
        self._listener = listener

    def charge(self, fp: str, model: str | None, now: float) -> Suspect:
        """One more engine failure with `fp` in flight."""
        suspect = self._put(fp, model, now)
        suspect.failures += 1
        if self._listener is not None:
            self._listener.charged(fp, model)
        return suspect

    def mark(self, fp: str, model: str | None, now: float) -> None:
        """A suspect without a failure here: other replicas' failures made it one."""
        self._put(fp, model, now)

    def _put(self, fp: str, model: str | None, now: float) -> Suspect:
        suspect = self._suspects.pop(fp, None)
        if suspect is None or now - suspect.last_failure > self.ttl_s:
            suspect = Suspect(fp, model, 0, now)
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
