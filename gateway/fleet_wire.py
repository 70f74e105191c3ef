"""What replicas sharing a quarantine write to Redis and say to each other: key names, messages,
the scripts that change the shared state in one step, and the pure decisions of gateway.fleet
(what to do with a local entry Redis no longer holds, which unsent changes to keep).

No I/O and no clock here: tested without a Redis.

Keys (all under `<key_prefix>:v<FINGERPRINT_VERSION>`, so replicas hashing requests differently
never share entries):
- `quarantine`            sorted set, fingerprint → until (ms): the fleet's entries, bounded;
- `quarantine:<fp>`       one entry as JSON, expiring by its Redis TTL;
- `released:<fp>`         a tombstone: cleared (or evicted) on purpose, not lost by Redis;
- `released-all`          when the whole quarantine was last cleared (ms);
- `suspicion:<fp>`        engine failures with the fingerprint in flight, fleet-wide (INCR,
                          sliding TTL);
- `suspects`              sorted set, fingerprint → until (ms): suspects of the whole fleet;
- `events`                the pub/sub channel every replica listens on.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from gateway.isolation import QuarantineEntry

# -- keys --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FleetKeys:
    base: str

    @classmethod
    def of(cls, prefix: str, version: int) -> FleetKeys:
        return cls(f"{prefix}:v{version}")

    @property
    def index(self) -> str:
        return f"{self.base}:quarantine"

    @property
    def entry_prefix(self) -> str:
        return f"{self.base}:quarantine:"

    def entry(self, fp: str) -> str:
        return self.entry_prefix + fp

    @property
    def released_prefix(self) -> str:
        return f"{self.base}:released:"

    def released(self, fp: str) -> str:
        return self.released_prefix + fp

    @property
    def released_all(self) -> str:
        return f"{self.base}:released-all"

    def suspicion(self, fp: str) -> str:
        return f"{self.base}:suspicion:{fp}"

    @property
    def suspects(self) -> str:
        return f"{self.base}:suspects"

    @property
    def channel(self) -> str:
        return f"{self.base}:events"


def ms(seconds: float) -> int:
    """Seconds as whole milliseconds, rounded up (a TTL is never 0)."""
    return max(1, math.ceil(seconds * 1000))


# -- entries and messages ----------------------------------------------------------------------


def encode_entry(entry: QuarantineEntry) -> dict[str, Any]:
    return {
        "fingerprint": entry.fingerprint,
        "model": entry.model,
        "since": entry.since,
        "until": entry.until,
        "reason": entry.reason,
        "failures": entry.failures,
        "found_by": entry.found_by,
    }


def decode_entry(data: object) -> QuarantineEntry | None:
    """An entry another replica wrote, or None when it is not one (never raises)."""
    if isinstance(data, str | bytes):
        try:
            data = json.loads(data)
        except ValueError:
            return None
    if not isinstance(data, dict):
        return None
    fp, model, since, until = (data.get(k) for k in ("fingerprint", "model", "since", "until"))
    reason, failures, found_by = data.get("reason"), data.get("failures"), data.get("found_by")
    if not (isinstance(fp, str) and fp and isinstance(reason, str)):
        return None
    if not (_number(since) and _number(until) and isinstance(failures, int)):
        return None
    if not (model is None or isinstance(model, str)):
        return None
    if not (found_by is None or isinstance(found_by, str)):
        return None
    return QuarantineEntry(fp, model, float(since), float(until), reason, failures, True, found_by)


def _number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class Quarantined:
    entry: QuarantineEntry


@dataclass(frozen=True, slots=True)
class Released:
    fingerprint: str | None
    """None: all of them."""


@dataclass(frozen=True, slots=True)
class Suspected:
    fingerprint: str
    model: str | None
    failures: int


Message = Quarantined | Released | Suspected


def encode_message(op: str, sender: str, **fields: Any) -> str:
    """One event on the channel. `sender` tells a replica its own messages apart."""
    return json.dumps({"op": op, "sender": sender, **fields}, separators=(",", ":"))


def decode_message(raw: str | bytes, me: str) -> Message | None:
    """The event in `raw`, or None when it is this process's own, unknown or malformed."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("sender") == me:
        return None
    op = data.get("op")
    fp = data.get("fingerprint")
    if op == "quarantine":
        entry = decode_entry(data.get("entry"))
        return None if entry is None else Quarantined(entry)
    if op == "release_all":
        return Released(None)
    if not (isinstance(fp, str) and fp):
        return None
    if op == "release":
        return Released(fp)
    if op == "suspect":
        model, failures = data.get("model"), data.get("failures")
        if (model is None or isinstance(model, str)) and isinstance(failures, int):
            return Suspected(fp, model, failures)
    return None


# -- changes waiting to be sent ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AddOp:
    entry: QuarantineEntry


@dataclass(frozen=True, slots=True)
class ReleaseOp:
    fingerprint: str | None
    at: float
    """Wall-clock seconds of the clear."""


@dataclass(frozen=True, slots=True)
class ChargeOp:
    fingerprint: str
    model: str | None


Op = AddOp | ReleaseOp | ChargeOp


class Pending:
    """Changes made here that Redis has not acknowledged yet, oldest first, bounded: what a
    replica found while Redis was unreachable is sent when it is back."""

    def __init__(self, max_ops: int) -> None:
        self.max_ops = max_ops
        self._ops: deque[Op] = deque()
        self.dropped = 0
        """Ops given up because the bound was reached (the oldest go first)."""

    def push(self, op: Op) -> None:
        if isinstance(op, ReleaseOp) and op.fingerprint is None:
            # A clear of everything makes every earlier add and release moot.
            self._ops = deque(o for o in self._ops if isinstance(o, ChargeOp))
        elif isinstance(op, ReleaseOp | AddOp):
            fp = op.fingerprint if isinstance(op, ReleaseOp) else op.entry.fingerprint
            self._ops = deque(o for o in self._ops if not _same_entry(o, fp))
        self._ops.append(op)
        while len(self._ops) > self.max_ops:
            self._ops.popleft()
            self.dropped += 1

    def peek(self) -> Op | None:
        return self._ops[0] if self._ops else None

    def pop(self, op: Op) -> None:
        """`op` was sent: drop it if it is still the first (a newer push may have replaced
        the queue in the meantime)."""
        if self._ops and self._ops[0] is op:
            self._ops.popleft()

    def __len__(self) -> int:
        return len(self._ops)


def _same_entry(op: Op, fp: str | None) -> bool:
    if isinstance(op, AddOp):
        return op.entry.fingerprint == fp
    return isinstance(op, ReleaseOp) and op.fingerprint == fp


# -- reconciling after a reconnect -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reconciled:
    forget: tuple[str, ...]
    """Shared here, released by the fleet while this replica was away."""
    republish: tuple[QuarantineEntry, ...]
    """Shared here, unknown to Redis and never released: Redis lost them (restart without
    persistence, failover); send them again."""


def reconcile(
    local: Iterable[QuarantineEntry],
    remote: Mapping[str, QuarantineEntry],
    tombstones: Mapping[str, bool],
    released_all_ms: int | None,
) -> Reconciled:
    """What to do with each proven local entry Redis does not hold. Entries found here by
    count alone (not proven on probation) are this replica's own and are left alone."""
    forget: list[str] = []
    republish: list[QuarantineEntry] = []
    for entry in local:
        if not entry.proven or entry.fingerprint in remote:
            continue
        cleared = tombstones.get(entry.fingerprint, False) or (
            released_all_ms is not None and entry.since * 1000 <= released_all_ms
        )
        if cleared:
            forget.append(entry.fingerprint)
        else:
            republish.append(entry)
    return Reconciled(tuple(forget), tuple(republish))


# -- scripts: each change to the shared state is one atomic step -------------------------------

_NOW_MS = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"

ADD_SCRIPT = (
    _NOW_MS
    + """
-- KEYS: index, entry, released, suspicion, suspects
-- ARGV: fp, entry json, ttl ms, until ms, max entries, entry prefix, released prefix,
--       channel, message, sender
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('PUBLISH', ARGV[8], ARGV[9])
local evicted = {}
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[5])
if excess > 0 then
  local popped = redis.call('ZPOPMIN', KEYS[1], excess)
  for i = 1, #popped, 2 do
    local fp = popped[i]
    redis.call('DEL', ARGV[6] .. fp)
    redis.call('SET', ARGV[7] .. fp, '1', 'PX', ARGV[3])
    redis.call('PUBLISH', ARGV[8],
      cjson.encode({op = 'release', sender = ARGV[10], fingerprint = fp}))
    evicted[#evicted + 1] = fp
  end
end
return evicted
"""
)

RELEASE_SCRIPT = """
-- KEYS: index, entry, released   ARGV: fp, tombstone ttl ms, channel, message
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
redis.call('SET', KEYS[3], '1', 'PX', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""

RELEASE_ALL_SCRIPT = """
-- KEYS: index, released-all   ARGV: entry prefix, ttl ms, channel, message, cleared at (ms)
local fps = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, fp in ipairs(fps) do redis.call('DEL', ARGV[1] .. fp) end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], ARGV[5], 'PX', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return #fps
"""

CHARGE_SCRIPT = (
    _NOW_MS
    + """
-- KEYS: suspicion, suspects
-- ARGV: ttl ms, suspect_failures, fp, until ms, max entries, channel, sender, model ('' none)
local n = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
if n >= tonumber(ARGV[2]) then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
  local excess = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[5])
  if excess > 0 then redis.call('ZPOPMIN', KEYS[2], excess) end
  local msg = {op = 'suspect', sender = ARGV[7], fingerprint = ARGV[3], failures = n}
  if ARGV[8] ~= '' then msg.model = ARGV[8] end
  redis.call('PUBLISH', ARGV[6], cjson.encode(msg))
end
return n
"""
)
