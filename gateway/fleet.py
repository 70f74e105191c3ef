"""One quarantine for every replica, shared through Redis (`isolation.shared`).

Each replica keeps its own `Quarantine` and `SuspectBook` (gateway.isolation); a request checks
only them, never Redis. `Fleet` keeps them in step with the other replicas:
- it is told (as their listener) of what this replica decides: a culprit proven on probation,
  a clear of one or all entries, an engine failure charged to a fingerprint; it sends each to
  Redis in one atomic script that also publishes it on the fleet's channel;
- it listens on that channel and applies what the others decided (entries, releases, fleet
  suspects);
- on start and after every reconnect it subscribes first, sends what it found meanwhile, then
  reloads the whole shared state (so nothing published in between is missed).

Redis unreachable: this replica keeps serving with its own quarantine (fail open for the
fleet-wide part), logs it once, shows it in `/ready`'s detail (`detail()`, `connected`), keeps
what it finds (bounded) and sends it when Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any, cast

import structlog
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterDownError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)

from gateway.config import IsolationConfig, SharedConfig
from gateway.fleet_wire import (
    ADD_SCRIPT,
    CHARGE_SCRIPT,
    RELEASE_ALL_SCRIPT,
    RELEASE_SCRIPT,
    AddOp,
    ChargeOp,
    FleetKeys,
    Op,
    Pending,
    Quarantined,
    Released,
    ReleaseOp,
    Suspected,
    decode_entry,
    decode_message,
    encode_entry,
    encode_message,
    ms,
    reconcile,
)
from gateway.isolation import FINGERPRINT_VERSION, Quarantine, QuarantineEntry, SuspectBook

log = structlog.get_logger("gateway.fleet")

REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, OSError)
"""What an unreachable or failing Redis raises (TimeoutError is an OSError)."""
PASSING_REFUSALS: tuple[type[ResponseError], ...] = (
    ReadOnlyError,  # connected to a replica during a failover
    OutOfMemoryError,
    NoPermissionError,
    TryAgainError,
    ClusterDownError,
)
"""Refusals that may pass: Redis counts as unreachable and the change is sent again later.
Any other refusal (a script error on a key someone else wrote) drops that one change."""
STOP_WAIT_S = 2.0
PENDING_MAX = 4096
"""Unsent changes kept while Redis is unreachable; past it the oldest are given up."""


class FleetState(StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    UNREACHABLE = "unreachable"


class Fleet:
    """This replica's link to the shared quarantine. Start it with `start()`, stop it with
    `stop()`; in between, Redis's availability never blocks a request."""

    def __init__(
        self,
        shared: SharedConfig,
        isolation: IsolationConfig,
        quarantine: Quarantine,
        suspects: SuspectBook,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.shared = shared
        self.isolation = isolation
        self.quarantine = quarantine
        self.suspects = suspects
        self.replica = shared.replica_id or socket.gethostname()
        self.sender = f"{self.replica}/{uuid.uuid4().hex[:12]}"
        """Unique per process: tells this replica's own messages apart on the channel."""
        self.keys = FleetKeys.of(shared.key_prefix, FINGERPRINT_VERSION)
        self._clock = wall_clock
        self._pending = Pending(PENDING_MAX)
        self._wake = asyncio.Event()
        self._synced = asyncio.Event()
        self._state = FleetState.CONNECTING
        self._down_since: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._redis: Redis = Redis.from_url(
            shared.url,
            username=shared.username,
            password=os.environ.get(shared.password_env) or None,
            socket_timeout=shared.command_timeout_s,
            socket_connect_timeout=shared.connect_timeout_s,
            health_check_interval=max(1, round(shared.health_check_s)),
            retry=Retry(NoBackoff(), 0),  # reconnecting is this class's loop, not each call's
            decode_responses=True,
            client_name=f"vllm-guard:{self.replica}",
        )
        self._add = self._redis.register_script(ADD_SCRIPT)
        self._release = self._redis.register_script(RELEASE_SCRIPT)
        self._release_all = self._redis.register_script(RELEASE_ALL_SCRIPT)
        self._charge = self._redis.register_script(CHARGE_SCRIPT)

    # -- what others read ----------------------------------------------------------------

    @property
    def state(self) -> FleetState:
        return self._state

    @property
    def connected(self) -> bool:
        """Whether Redis is reachable and this replica's mirror is in step (for a metric)."""
        return self._state is FleetState.CONNECTED

    @property
    def unsent(self) -> int:
        """Changes made here that Redis has not acknowledged yet."""
        return len(self._pending)

    @property
    def dropped(self) -> int:
        """Unsent changes given up because too many waited (Redis away for long)."""
        return self._pending.dropped

    def detail(self) -> dict[str, Any]:
        """For `/ready`'s body: never its status (fail open)."""
        out: dict[str, Any] = {"redis": str(self._state), "replica": self.replica}
        if self._pending:
            out["unsent"] = len(self._pending)
        if self._down_since is not None:
            out["unreachable_since"] = self._down_since
        return out

    # -- told by the quarantine and the suspect book (synchronous, never blocks) ----------

    def quarantined(self, entry: QuarantineEntry) -> None:
        if entry.proven:  # only a culprit proven on probation is quarantined fleet-wide
            self._push(AddOp(entry))

    def released(self, fp: str | None) -> None:
        self._push(ReleaseOp(fp, self._clock()))

    def charged(self, fp: str, model: str | None) -> None:
        self._push(ChargeOp(fp, model))

    def _push(self, op: Op) -> None:
        self._pending.push(op)
        self._wake.set()

    # -- lifetime ------------------------------------------------------------------------

    async def start(self) -> None:
        """Attach to the quarantine and the suspect book, connect, and wait (bounded) for the
        first full load, so a replica started after a quarantine already knows it."""
        self.quarantine.attach(self, self.replica)
        self.suspects.attach(self)
        self._task = asyncio.create_task(self._run(), name="fleet")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(
                self.shared.connect_timeout_s + self.shared.command_timeout_s
            ):
                await self._synced.wait()

    async def stop(self) -> None:
        # The loops also end on this flag: a cancellation can be lost inside the client.
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=STOP_WAIT_S + self.shared.health_check_s)
        if self._pending:
            log.warning("fleet_unsent_at_stop", unsent=len(self._pending))
        with contextlib.suppress(*REDIS_ERRORS):
            await self._redis.aclose()

    async def _run(self) -> None:
        delay = self.shared.reconnect_s
        while not self._stopping:
            try:
                try:
                    await self._session()
                except* REDIS_ERRORS as group:
                    self._down(group.exceptions[0])
            except Exception as err:  # a bug here must not end sharing for good
                log.exception("fleet_error")
                self._down(err)
            if self._stopping:
                return
            if self._synced.is_set():  # the last session got as far as a full load
                self._synced.clear()
                delay = self.shared.reconnect_s
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.shared.reconnect_s * 10)

    async def _session(self) -> None:
        """Subscribe, send what waits, reload everything, then listen and send as it comes,
        until Redis fails (raises)."""
        pubsub = self._redis.pubsub()
        try:
            await pubsub.subscribe(self.keys.channel)
            await self._subscribed(pubsub)
            sent = await self._flush()
            await self._reload()
            sent += await self._flush()  # what the reload found Redis had lost
            self._up(sent)
            async with asyncio.TaskGroup() as group:
                group.create_task(self._listen(pubsub))
                group.create_task(self._write())
        finally:
            with contextlib.suppress(*REDIS_ERRORS):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _subscribed(self, pubsub: PubSub) -> None:
        """Wait for Redis to confirm the subscription: from then on nothing is missed."""
        async with asyncio.timeout(self.shared.command_timeout_s):
            while True:
                message = await pubsub.get_message(timeout=self.shared.command_timeout_s)
                if message is not None and message["type"] == "subscribe":
                    return

    def _up(self, sent: int) -> None:
        was = self._state
        self._state = FleetState.CONNECTED
        self._down_since = None
        self._synced.set()
        event = "fleet_redis_back" if was is FleetState.UNREACHABLE else "fleet_redis_connected"
        log.info(
            event,
            replica=self.replica,
            sent=sent,
            entries=len(self.quarantine.entries(self._clock())),
        )

    def _down(self, err: BaseException) -> None:
        if self._state is not FleetState.UNREACHABLE:  # once per outage
            log.warning(
                "fleet_redis_unreachable",
                replica=self.replica,
                error=f"{type(err).__name__}: {err}",
                detail="serving with this replica's quarantine only; catching up when back",
            )
            self._state = FleetState.UNREACHABLE
            self._down_since = self._clock()

    # -- sending -------------------------------------------------------------------------

    async def _write(self) -> None:
        while not self._stopping:
            await self._flush()
            self._wake.clear()
            try:
                async with asyncio.timeout(self.shared.health_check_s):
                    await self._wake.wait()
            except TimeoutError:
                await cast("Awaitable[bool]", self._redis.ping())  # a silent Redis is noticed

    async def _flush(self) -> int:
        sent = 0
        while (op := self._pending.peek()) is not None:
            try:
                await self._send(op)
                sent += 1
            except ResponseError as err:  # Redis answered, and refused it: never retried
                if isinstance(err, PASSING_REFUSALS):
                    raise
                log.exception("fleet_change_refused", change=type(op).__name__)
            self._pending.pop(op)
        return sent

    async def _send(self, op: Op) -> None:
        keys, now, ttl_s = self.keys, self._clock(), self.isolation.quarantine_ttl_s
        if isinstance(op, AddOp):
            entry = op.entry
            if entry.until <= now:
                return
            fp = entry.fingerprint
            shared = {**encode_entry(entry), "found_by": entry.found_by or self.replica}
            message = encode_message("quarantine", self.sender, entry=shared)
            evicted = await self._add(
                keys=[
                    keys.index,
                    keys.entry(fp),
                    keys.released(fp),
                    keys.suspicion(fp),
                    keys.suspects,
                ],
                args=[
                    fp,
                    json.dumps(shared),
                    ms(entry.until - now),
                    ms(entry.until),
                    self.isolation.quarantine_max_entries,
                    keys.entry_prefix,
                    keys.released_prefix,
                    keys.channel,
                    message,
                    self.sender,
                ],
            )
            for gone in evicted:  # the fleet's bound on entries: the oldest went everywhere
                if gone != fp:
                    self.quarantine.forget(gone)
            log.info("fleet_quarantine_sent", fingerprint=fp, evicted=len(evicted))
        elif isinstance(op, ReleaseOp) and op.fingerprint is not None:
            fp = op.fingerprint
            message = encode_message("release", self.sender, fingerprint=fp)
            await self._release(
                keys=[keys.index, keys.entry(fp), keys.released(fp)],
                args=[fp, ms(ttl_s), keys.channel, message],
            )
        elif isinstance(op, ReleaseOp):
            message = encode_message("release_all", self.sender)
            await self._release_all(
                keys=[keys.index, keys.released_all],
                args=[keys.entry_prefix, ms(ttl_s), keys.channel, message, ms(op.at)],
            )
        else:
            await self._charge(
                keys=[keys.suspicion(op.fingerprint), keys.suspects],
                args=[
                    ms(ttl_s),
                    self.isolation.suspect_failures,
                    op.fingerprint,
                    ms(now + ttl_s),
                    self.isolation.quarantine_max_entries,
                    keys.channel,
                    self.sender,
                    op.model or "",
                ],
            )

    # -- receiving -----------------------------------------------------------------------

    async def _listen(self, pubsub: PubSub) -> None:
        while not self._stopping:
            message = await pubsub.get_message(timeout=self.shared.health_check_s)
            if message is not None and message["type"] == "message":
                self._apply(message["data"])

    def _apply(self, raw: str) -> None:
        message = decode_message(raw, self.sender)
        now = self._clock()
        if isinstance(message, Quarantined):
            entry = message.entry
            if entry.until > now:
                self.quarantine.load(entry)
                log.info(
                    "fleet_quarantine_received",
                    fingerprint=entry.fingerprint,
                    found_by=entry.found_by,
                    lag_ms=round((now - entry.since) * 1000, 1),
                )
        elif isinstance(message, Released):
            self.quarantine.forget(message.fingerprint)
            log.info("fleet_quarantine_released", fingerprint=message.fingerprint)
        elif isinstance(message, Suspected):
            self.suspects.mark(message.fingerprint, message.model, now)
            log.info("fleet_suspect", fingerprint=message.fingerprint, failures=message.failures)

    async def _reload(self) -> None:
        """Make the mirror what Redis holds: its entries and suspects; what this replica holds
        and Redis does not is forgotten when released meanwhile, else sent again."""
        r, keys, now = self._redis, self.keys, self._clock()
        fps: list[str] = await r.zrange(keys.index, 0, -1)
        raws: list[str | None] = await r.mget([keys.entry(fp) for fp in fps]) if fps else []
        remote = {e.fingerprint: e for e in map(decode_entry, raws) if e is not None}
        released_all = await r.get(keys.released_all)
        local = [
            e for e in self.quarantine.entries(now) if e.proven and e.fingerprint not in remote
        ]
        marks = await r.mget([keys.released(e.fingerprint) for e in local]) if local else []
        plan = reconcile(
            local,
            remote,
            {e.fingerprint: mark is not None for e, mark in zip(local, marks, strict=True)},
            int(released_all) if released_all is not None and released_all.isdigit() else None,
        )
        for fp in plan.forget:
            self.quarantine.forget(fp)
        for entry in plan.republish:
            self._pending.push(AddOp(entry))
        for entry in remote.values():
            if entry.until > now:
                self.quarantine.load(entry)
        suspects: list[str] = await r.zrangebyscore(keys.suspects, ms(now), "+inf")
        for fp in suspects:
            self.suspects.mark(fp, None, now)
