"""The gate between admitted requests and the engine: when a request may go.

One place decides it, from the engine's state, the quarantine, the suspects on probation and
the bulkhead:
- quarantined fingerprint → 422 at once, never the engine;
- engine not ready: held while a restart is coming (bounded queue, bounded time), else 503 at
  once; past the bounds 503 with Retry-After. In the sidecar shape the kubelet restarts the
  engine: requests are held for up to `engine.sidecar_hold_s` after it stopped being ready;
- a suspect runs alone (probation): it waits until nothing else is in flight, and nothing new
  starts while it waits or runs; past `probation_timeout_s` alone it is answered 503;
- otherwise at most `max_in_flight` requests of a model are in flight to the engine (each
  request counts once); the excess waits in the same queue, and past it gets 429;
- a client (its bearer token, or its address) with `max_in_flight_per_client` of a model's
  requests in flight or waiting gets 429 at once: one client cannot hold every slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from engine.settings import EngineConfig
from engine.state import EngineState, StateChange
from gateway.config import IsolationConfig
from gateway.errors import (
    Cause,
    EngineErrored,
    EngineUnavailable,
    EngineUnreachable,
    Overloaded,
    Quarantined,
)
from gateway.inflight import Inflight, InflightLedger
from gateway.isolation import (
    InFlightRequest,
    Quarantine,
    QuarantineEntry,
    SuspectBook,
    attribute_failure,
)


class EngineView(Protocol):
    """What the gate needs of the engine supervisor."""

    @property
    def state(self) -> EngineState: ...
    @property
    def supervised(self) -> bool: ...
    @property
    def epoch(self) -> int: ...
    def is_ready(self) -> bool: ...
    def restart_expected(self) -> bool: ...
    def retry_after_s(self) -> float: ...
    def subscribe(self, callback: Callable[[StateChange], None]) -> None: ...
    def report_engine_failure(self, reason: str) -> None: ...
    async def settle(self, suspicion: str) -> bool: ...


T = TypeVar("T")


class Gate:
    def __init__(
        self,
        config: IsolationConfig,
        supervisor: EngineView,
        ledger: InflightLedger,
        engine: EngineConfig,
        *,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.supervisor = supervisor
        self.ledger = ledger
        self.quarantine = Quarantine(config.quarantine_ttl_s, config.quarantine_max_entries)
        self.suspects = SuspectBook(config.quarantine_ttl_s, config.quarantine_max_entries)
        self.bulkhead: Callable[[str | None], int] | None = None
        """The current `max_in_flight` of a model, read at each admission so that a live
        reload's smaller bulkhead holds back requests already waiting; None: the size each
        request brought."""
        self.wall_clock = wall_clock
        self._clock = clock
        self._changed = asyncio.Event()
        self.reconfigure(config, engine)
        self._by_model: Counter[str | None] = Counter()
        self._by_client: Counter[tuple[str | None, str]] = Counter()
        """Requests of each (model, client) in flight or waiting, for the per-client share."""
        self._share_of: dict[Inflight, tuple[str | None, str]] = {}
        self._solo: Inflight | None = None
        self._suspects_waiting = 0
        self._waiting = 0
        self._left_ready_at = clock()  # not ready yet
        self._waiting_by: Counter[str | None] = Counter()
        # Read by the metrics at scrape time; only the gate changes them.
        self.probation_runs = 0
        self.verdicts: Counter[str] = Counter()
        """Probation verdicts: culprit, innocent, timeout."""
        supervisor.subscribe(self._on_state_change)

    def reconfigure(self, config: IsolationConfig, engine: EngineConfig) -> None:
        """Isolation and engine settings of a new snapshot; applies to the next decision
        (entries already quarantined keep their expiry)."""
        self.config = config
        self.sidecar_hold_s = engine.sidecar_hold_s
        # A failure report is confirmed by probes: allow for a full round of failed ones.
        self.settle_timeout_s = (
            engine.probe_timeout_s + engine.health_failures * engine.startup_probe_interval_s + 2.0
        )
        self.wedge_detect_s = engine.wedge_timeout_s + engine.probe_timeout_s + 5.0
        for book in (self.quarantine, self.suspects):
            book.ttl_s, book.max_entries = config.quarantine_ttl_s, config.quarantine_max_entries
        self._notify()  # waiters look again (a larger bulkhead may admit them now)

    # -- state changes ---------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _on_state_change(self, change: StateChange) -> None:
        if change.old is EngineState.READY and change.new is not EngineState.READY:
            self._left_ready_at = self._clock()
            self._attribute()
        self._notify()

    def _attribute(self) -> None:
        """The engine failed: every ticket in flight is a suspect; blame per the rules."""
        in_flight = [t for t in self.ledger if not t.engine_failed]
        for ticket in in_flight:
            ticket.engine_failed = True
        if not self.config.enabled or not in_flight:
            return
        verdict = attribute_failure(
            (InFlightRequest(t.fingerprint, t.model, t.solo) for t in in_flight),
            self.suspects,
            self.config.suspect_failures,
            self.wall_clock(),
        )
        alone = {t.fingerprint for t in in_flight if t.solo}
        for culprit in verdict.quarantine:
            if culprit.fingerprint in alone:
                self.verdicts["culprit"] += 1
            # Proven: it ran alone on probation (the only kind other replicas are told of).
            self.quarantine.add(
                culprit.fingerprint,
                culprit.model,
                culprit.reason,
                culprit.failures,
                self.wall_clock(),
                proven=culprit.fingerprint in alone,
            )
            self.suspects.acquit(culprit.fingerprint)

    # -- the gate --------------------------------------------------------------------------

    def check_quarantine(self, fp: str) -> None:
        entry = self.quarantine.get(fp, self.wall_clock())
        if entry is not None:
            raise quarantined_error(entry)

    async def wait_engine(self, deadline: float, model: str | None = None) -> None:
        """Hold until the engine is ready (it must be, to know its models and context), or
        answer 503: at once when no restart is coming, else past the queue's bounds. `model`
        (the one asked for) is what the queue is counted under."""
        await self._wait(self.supervisor.is_ready, lambda: False, deadline, model)

    async def enter(
        self,
        request_id: str,
        model: str | None,
        fp: str,
        max_in_flight: int,
        deadline: float,
        share: ClientShare | None = None,
    ) -> Inflight:
        """Wait until this request may go to the engine (`deadline` is monotonic), and put
        it in flight. With a `share`, a client already at it is refused at once (429)."""
        entry = _Entry(request_id, model, fp, max_in_flight)
        key = None if share is None else (model, share.client)
        if share is not None and key is not None:
            if self._by_client[key] >= share.limit:
                raise Overloaded(
                    f"This client already has {share.limit} requests of this model in "
                    "flight (max_in_flight_per_client); retry when one is answered.",
                    retry_after_s=1,
                    cause=Cause.CLIENT_SHARE,
                )
            self._by_client[key] += 1
        try:
            await self._wait(lambda: self._try_take(entry), lambda: entry.suspect, deadline, model)
        except BaseException:
            self._leave_share(key)
            raise
        finally:
            if entry.suspect:
                self._suspects_waiting -= 1
                self._notify()
        assert entry.ticket is not None  # _wait returns once _try_take took one
        if key is not None:
            self._share_of[entry.ticket] = key
        return entry.ticket

    def _leave_share(self, key: tuple[str | None, str] | None) -> None:
        if key is not None:
            self._by_client[key] -= 1
            if self._by_client[key] <= 0:
                del self._by_client[key]

    def _try_take(self, entry: _Entry) -> bool:
        """Put the request in flight if it may go now (raises once it is quarantined)."""
        self.check_quarantine(entry.fp)
        is_suspect = self.config.enabled and self.suspects.is_suspect(entry.fp, self.wall_clock())
        if is_suspect != entry.suspect:  # became a suspect, or was acquitted while waiting
            entry.suspect = is_suspect
            self._suspects_waiting += 1 if is_suspect else -1
        if not self.supervisor.is_ready() or self._solo is not None:
            return False
        if is_suspect:
            if len(self.ledger):
                return False
        elif self._suspects_waiting or self._by_model[entry.model] >= self._limit(entry):
            return False
        entry.ticket = self._take(entry.request_id, entry.model, entry.fp, solo=is_suspect)
        return True

    def _limit(self, entry: _Entry) -> int:
        """The bulkhead's size for this request's model: the current snapshot's when a live
        reload may have changed it, else the size the request brought."""
        return entry.max_in_flight if self.bulkhead is None else self.bulkhead(entry.model)

    async def _wait(
        self,
        ready: Callable[[], bool],
        is_suspect: Callable[[], bool],
        deadline: float,
        model: str | None,
    ) -> None:
        """Wait in the queue until `ready()` holds. A suspect may wait until its deadline;
        anything else for at most `queue_timeout_s`."""
        if ready():
            return
        if self._waiting >= self.config.queue_max:
            raise self._full(Cause.QUEUE_FULL)
        self._waiting += 1
        self._waiting_by[model] += 1
        try:
            start = self._clock()
            while True:
                if not self.supervisor.is_ready() and not self.holds_for_restart():
                    held = not self.supervisor.supervised and self.supervisor.restart_expected()
                    raise EngineUnavailable(
                        f"The engine is not available ({self.supervisor.state}) and "
                        + (
                            f"was not back within {self.sidecar_hold_s:g}s."
                            if held
                            else "no restart is coming."
                        ),
                        retry_after_s=self.supervisor.retry_after_s(),
                        cause=self._down_cause(),
                    )
                timeout_at = start + self.config.queue_timeout_s
                limit = deadline if is_suspect() else min(deadline, timeout_at)
                if not self.supervisor.supervised and not self.supervisor.is_ready():
                    limit = min(limit, self._left_ready_at + self.sidecar_hold_s)
                now = self._clock()
                if now >= limit:
                    raise self._full(None if limit < deadline else Cause.DEADLINE)
                event = self._changed
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), timeout=min(limit - now, 1.0))
                if ready():
                    return
        finally:
            self._waiting -= 1
            self._waiting_by[model] -= 1
            if not self._waiting_by[model]:
                del self._waiting_by[model]

    def _down_cause(self) -> Cause:
        state = self.supervisor.state
        if state is EngineState.STARTING:
            return Cause.ENGINE_STARTING
        if state in {EngineState.GIVEN_UP, EngineState.STOPPED}:
            return Cause.GIVEN_UP
        return Cause.ENGINE_DOWN

    def _full(self, cause: Cause | None) -> Exception:
        """The answer to a request the queue cannot hold or held too long (`cause` None:
        timed out at `queue_timeout_s`)."""
        if not self.supervisor.is_ready():
            return EngineUnavailable(
                f"The engine is restarting ({self.supervisor.state}); the request waited "
                "as long as it may.",
                retry_after_s=self.supervisor.retry_after_s(),
                cause=cause or Cause.QUEUE_TIMEOUT,
            )
        return Overloaded(
            "The engine is at capacity and the gateway's queue is full or the request "
            "waited too long; retry later.",
            retry_after_s=2,
            cause=cause or Cause.BULKHEAD,
        )

    def _take(self, request_id: str, model: str | None, fp: str, *, solo: bool) -> Inflight:
        ticket = self.ledger.add(request_id, model, fp, solo=solo)
        self._by_model[model] += 1
        if solo:
            self._solo = ticket
            self.probation_runs += 1
        return ticket

    def leave(self, ticket: Inflight, *, answered: bool) -> None:
        """The attempt is over. A suspect that was answered while alone is innocent."""
        self.ledger.remove(ticket)
        self._by_model[ticket.model] -= 1
        self._leave_share(self._share_of.pop(ticket, None))
        if self._solo is ticket:
            self._solo = None
            if answered and not ticket.engine_failed:
                self.verdicts["innocent"] += 1
                self.suspects.acquit(ticket.fingerprint)
        self._notify()

    def probation_timed_out(self) -> None:
        """A suspect alone on probation ran past `solo_limit()` and was answered 503."""
        self.verdicts["timeout"] += 1

    def in_flight_by_model(self) -> dict[str | None, int]:
        """Requests in flight to the engine, by model (for the metrics)."""
        return {model: n for model, n in self._by_model.items() if n}

    def waiting_by_model(self) -> dict[str | None, int]:
        """Requests waiting at the gate, by the model they asked for (for the metrics)."""
        return dict(self._waiting_by)

    def holds_for_restart(self) -> bool:
        """Whether requests wait for an engine that is down: while the supervisor restarts it
        and expects it back, or (sidecar shape) for `sidecar_hold_s` after it stopped being
        ready, while the kubelet brings it back."""
        if not self.supervisor.restart_expected():
            return False
        return (
            self.supervisor.supervised or self._clock() < self._left_ready_at + self.sidecar_hold_s
        )

    async def engine_failed_with(self, ticket: Inflight) -> bool:
        """After a failed exchange: did the engine fail with this attempt in flight? True once
        the supervisor declares it failed (the attempt is then attributed); False as soon as a
        probe generation answers, or after `settle_timeout_s` without a verdict."""
        if ticket.engine_failed:
            return True
        return await self._verdict(lambda: ticket.engine_failed, "an in-flight request")

    async def exchange(self, call: Callable[[], Awaitable[T]], deadline: float) -> T:
        """Run one of admission's own exchanges with the engine (`call`: a /tokenize count, or
        whatever later asks the engine before the generation). A refused or reset connection
        there, or a 5xx answer, is settled like a generation call's: reported to the
        supervisor; if the engine failed, the request waits for it (within `deadline` and the
        queue's bounds) and the exchange runs again; if the engine is fine, the error stands
        (a 503 with Retry-After)."""
        while True:
            epoch = self.supervisor.epoch
            try:
                return await call()
            except (EngineUnreachable, EngineErrored):
                failed = await self._verdict(self._failed_since(epoch), "an admission exchange")
                if not failed:
                    raise
                await self.wait_engine(deadline)

    def _failed_since(self, epoch: int) -> Callable[[], bool]:
        return lambda: self.supervisor.epoch != epoch or not self.supervisor.is_ready()

    async def _verdict(self, failed: Callable[[], bool], what: str) -> bool:
        """Report a lost exchange and wait for the verdict: True once `failed()` holds (the
        supervisor declared the engine failed), False when a probe generation answers or after
        `settle_timeout_s`."""
        if failed():
            return True
        self.supervisor.report_engine_failure(f"{what} lost its engine")
        probe = asyncio.ensure_future(self.supervisor.settle(f"{what} failed"))
        deadline = self._clock() + self.settle_timeout_s
        try:
            while not failed():
                if probe.done() and probe.result():
                    return False
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return False
                changed = asyncio.ensure_future(self._changed.wait())
                waiters: list[asyncio.Future[Any]] = [changed]
                if not probe.done():
                    waiters.append(probe)
                await asyncio.wait(
                    waiters, timeout=min(remaining, 0.5), return_when=asyncio.FIRST_COMPLETED
                )
                changed.cancel()
            return True
        finally:
            if not probe.done():
                probe.cancel()

    def solo_limit(self) -> float:
        """How long a suspect may run alone: at least long enough for a wedge to be detected
        (and so attributed to it) before it is cut."""
        return max(self.config.probation_timeout_s, self.wedge_detect_s)


@dataclass(frozen=True, slots=True)
class ClientShare:
    """Who a request comes from (gateway.edge.client_key) and how many of a model's requests
    it may have in flight or waiting at once."""

    client: str
    limit: int


@dataclass(slots=True, eq=False)
class _Entry:
    """One request waiting at the gate: whether it waits as a suspect, and its ticket once
    it was let in."""

    request_id: str
    model: str | None
    fp: str
    max_in_flight: int
    suspect: bool = False
    ticket: Inflight | None = None


def quarantined_error(entry: QuarantineEntry) -> Quarantined:
    until = datetime.fromtimestamp(entry.until, UTC).isoformat(timespec="seconds")
    return Quarantined(
        f"This request was quarantined because the engine died while serving it "
        f"({entry.reason}). Identical requests are refused until {until}. "
        f"Fingerprint {entry.fingerprint}.",
        param=None,
    )
