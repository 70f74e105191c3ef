"""One admitted request's exchange with the engine: attempts until one answers.

`answer` is two steps, each a function with one job:

- `first_answer`: send the request through the gate and relay what the engine says. An engine
  failure before the client saw a byte is settled (did the engine fail with it in flight?) and,
  if it did, retried as a suspect: the gate's probation decides when it may go again.
- `resume`: once a stream was cut after the client had bytes, ask for the rest of the answer
  (gateway.resume) and relay it into the same stream, or end it with vLLM's error event.

The relay reports what happened as a value (`proxy.RelayOutcome`); the state of the exchange lives
in one `Exchange`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from engine.supervisor import EngineSupervisor
from gateway.admission import ClientShare, Gate
from gateway.body import encode_body
from gateway.engine_wire import WireResponse
from gateway.errors import EngineFailed, EngineUnavailable, GuardError
from gateway.inflight import Inflight
from gateway.keys import CONFIG, GATE, RECORD, SUPERVISOR, UPSTREAM
from gateway.proxy import (
    Answered,
    CutAfterBytes,
    FailedBeforeBytes,
    ProgressCallback,
    RelayOutcome,
    Upstream,
    continue_stream,
    end_stream_with_error,
    engine_answer,
    forward_headers,
    relay_response,
)
from gateway.requestlog import Outcome, RequestRecord
from gateway.resume import (
    EventRewriter,
    Partial,
    StreamLog,
    continuation,
    partial_answer,
    resumable,
)

Relay = Callable[[WireResponse, ProgressCallback], Awaitable[RelayOutcome]]
"""Relays the engine's response to the client and reports the outcome."""

PROBATION_TIMEOUT = (
    "The request is a suspect of an engine failure and did not finish alone on probation in time."
)
STREAM_CUT = "The engine failed during the stream; the answer is incomplete."


@dataclass(slots=True, eq=False)
class Exchange:
    """The state of one admitted request's exchange with the engine."""

    request: web.Request
    record: RequestRecord
    gate: Gate
    upstream: Upstream
    supervisor: EngineSupervisor
    path: str
    """The engine's path (without the KServe prefix)."""
    chat: bool
    body: dict[str, Any]
    """As admitted: the client's body with the output limit made explicit."""
    model: str
    fingerprint: str
    max_in_flight: int
    deadline: float
    """Monotonic; how long the request may wait at the gate."""
    engine_headers: CIMultiDict[str]
    client_headers: dict[str, str]
    log: StreamLog | None
    """The bytes the client received, kept when the stream could be resumed."""
    write_timeout_s: float
    """How long a write may wait for a client that does not read (`ClientTooSlow` past it)."""
    usage: Usage
    """Where the engine's usage is to be read, for the token metrics."""
    share: ClientShare | None = None
    """The client's share of the bulkhead, when the policy gives one."""
    finite: bool = False
    """The body holds no NaN or infinity (orjson parsed the client's): encoded without
    looking for one (`gateway.body.encode_body`)."""
    attempts: int = 0

    @classmethod
    def of(
        cls,
        request: web.Request,
        *,
        path: str,
        chat: bool,
        body: dict[str, Any],
        client_headers: dict[str, str],
        model: str,
        fingerprint: str,
        max_in_flight: int,
        deadline: float,
        share: ClientShare | None = None,
        finite: bool = False,
    ) -> Exchange:
        app = request.app
        record = request[RECORD]
        engine_headers = forward_headers(request.headers, record.request_id)
        engine_headers["Content-Type"] = "application/json"
        client_headers["X-Request-Id"] = record.request_id
        return cls(
            request,
            record,
            app[GATE],
            app[UPSTREAM],
            app[SUPERVISOR],
            path,
            chat,
            body,
            model,
            fingerprint,
            max_in_flight,
            deadline,
            engine_headers,
            client_headers,
            StreamLog() if resumable(body, chat) else None,
            app[CONFIG].current.server.client_write_timeout_s,
            _usage_in(body),
            share,
            finite,
        )

    async def enter(self) -> Inflight:
        """One more attempt: wait at the gate until it may go to the engine."""
        self.attempts += 1
        record = self.record
        entered = time.perf_counter()
        ticket = await self.gate.enter(
            record.request_id,
            self.model,
            self.fingerprint,
            self.max_in_flight,
            self.deadline,
            self.share,
        )
        if record.sent is None:  # held before the engine first had it: not the gateway's cost
            record.held += time.perf_counter() - entered
        return ticket

    def answered(self) -> None:
        self.record.fields["attempts"] = self.attempts

    def engine_failed(self) -> None:
        fields = self.record.fields
        fields["engine_failures"] = fields.get("engine_failures", 0) + 1


class Usage(IntEnum):
    """Where an answer's token usage is read (gateway.metrics.usage_of)."""

    NONE = 0
    """A stream the client did not ask usage for: not counted."""
    WHOLE = 1
    """A JSON answer: its body's `usage`."""
    STREAM = 2
    """A stream with `stream_options.include_usage`: its last usage event."""


def _usage_in(body: dict[str, Any]) -> Usage:
    if body.get("stream") is not True:
        return Usage.WHOLE
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return Usage.STREAM
    return Usage.NONE


@dataclass(frozen=True, slots=True)
class Resumable:
    """A stream the engine cut after the client had bytes, and what the client has of it."""

    stream: web.StreamResponse
    partial: Partial


async def answer(ex: Exchange) -> web.StreamResponse:
    """The engine's answer to an admitted request: the first one, then the rest of a stream
    the engine cut."""
    first = await first_answer(ex)
    if isinstance(first, Resumable):
        return await resume(ex, first)
    return first


async def first_answer(ex: Exchange) -> web.StreamResponse | Resumable:
    """Attempts until the engine answers, or fails in a way that is not the engine's (its own
    answer is relayed). A stream the engine cut after bytes is returned to be resumed when it
    can be, else ended with the error event."""
    payload = encode_body(ex.body, finite=ex.finite)

    def relay(upstream: WireResponse, on_progress: ProgressCallback) -> Awaitable[RelayOutcome]:
        return relay_response(
            ex.request,
            upstream,
            ex.client_headers,
            on_progress,
            write_timeout_s=ex.write_timeout_s,
        )

    while True:
        ticket = await ex.enter()
        answered = False
        try:
            outcome = await _send(ex, ticket, payload, relay)
            if isinstance(outcome, Answered):
                answered = True
                ex.answered()
                return outcome.response
            if isinstance(outcome, CutAfterBytes):
                partial = await _after_cut(ex, ticket, outcome.stream)
                return outcome.stream if partial is None else Resumable(outcome.stream, partial)
            if not await ex.gate.engine_failed_with(ticket):
                answered = True  # by the engine, which stayed fine: not a culprit
                return engine_answer(outcome, ex.supervisor.retry_after_s())
            # The engine failed with this request in flight and the client has seen nothing:
            # it is now a suspect; the next round waits for the engine and probation.
            ex.engine_failed()
        except TimeoutError:
            ex.gate.probation_timed_out()
            raise EngineUnavailable(
                PROBATION_TIMEOUT, retry_after_s=ex.supervisor.retry_after_s()
            ) from None
        finally:
            ex.gate.leave(ticket, answered=answered)


async def resume(ex: Exchange, cut: Resumable) -> web.StreamResponse:
    """Ask for the rest of a cut stream's answer and relay it into the same stream, until the
    answer is whole; or end the stream with vLLM's error event."""
    stream, partial = cut.stream, cut.partial
    while True:
        try:
            ticket = await ex.enter()
        except GuardError as err:
            await end_stream_with_error(stream, err.message)
            return stream
        answered = False
        try:
            rest = continuation(ex.body, partial, ex.chat)
            if rest is None:  # nothing left to generate: just end the stream
                await stream.write(b"data: [DONE]\n\n")
                await stream.write_eof()
                answered = True
                return stream
            relay = _continue(stream, partial, ex.chat, ex.write_timeout_s)
            outcome = await _send(ex, ticket, encode_body(rest, finite=ex.finite), relay)
            if isinstance(outcome, Answered):
                answered = True
                ex.answered()
                return stream
            if isinstance(outcome, CutAfterBytes):
                cut_again = await _after_cut(ex, ticket, stream)
                if cut_again is None:
                    return stream
                partial = cut_again
            elif not await _ask_again(ex, ticket, stream, outcome):
                return stream
        except TimeoutError:
            ex.gate.probation_timed_out()
            await end_stream_with_error(stream, PROBATION_TIMEOUT)
            return stream
        finally:
            ex.gate.leave(ticket, answered=answered)


async def _send(ex: Exchange, ticket: Inflight, payload: bytes, relay: Relay) -> RelayOutcome:
    """One attempt: open the request at the engine and relay its answer. A suspect alone on
    probation gets `Gate.solo_limit()` for it (TimeoutError past it)."""
    record, ledger, log, usage = ex.record, ex.gate.ledger, ex.log, ex.usage
    split = False  # the stream's usage event may end in the next chunk

    def on_progress(chunk: bytes) -> None:
        nonlocal split
        record.mark_first_byte()
        ledger.progress(ticket, len(chunk))
        if log is not None:
            log.append(chunk)
        if usage is Usage.WHOLE:
            record.usage = chunk
        elif usage is Usage.STREAM:
            if b'"usage"' in chunk:
                record.usage, split = chunk, True
            elif split and record.usage is not None:
                record.usage, split = record.usage + chunk, False

    if not ticket.solo:  # no time limit: no timeout to arm
        return await _attempt(ex, payload, relay, on_progress)
    async with asyncio.timeout(ex.gate.solo_limit()):
        return await _attempt(ex, payload, relay, on_progress)


async def _attempt(
    ex: Exchange, payload: bytes, relay: Relay, on_progress: ProgressCallback
) -> RelayOutcome:
    ex.record.mark_sent()
    try:
        upstream = await ex.upstream.open("POST", ex.path, payload, ex.engine_headers)
    except EngineFailed as err:
        return FailedBeforeBytes(err.message)
    return await relay(upstream, on_progress)


def _continue(
    stream: web.StreamResponse, partial: Partial, chat: bool, write_timeout_s: float
) -> Relay:
    rewriter = EventRewriter(partial, chat)

    def relay(upstream: WireResponse, on_progress: ProgressCallback) -> Awaitable[RelayOutcome]:
        return continue_stream(
            stream, upstream, rewriter.feed, on_progress, write_timeout_s=write_timeout_s
        )

    return relay


async def _after_cut(ex: Exchange, ticket: Inflight, stream: web.StreamResponse) -> Partial | None:
    """The engine cut the stream after the client had bytes. What the client has, to resume
    from, when the engine failed with this attempt in flight and it reads back; else None
    once the stream was ended with the error event."""
    ex.engine_failed()
    partial = None
    if await ex.gate.engine_failed_with(ticket) and ex.log is not None:
        partial = partial_answer(ex.log, ex.chat)
    if partial is None:
        ex.record.outcome = Outcome.STREAM_CUT
        await end_stream_with_error(stream, STREAM_CUT)
        return None
    ex.record.fields["resumed"] = ex.record.fields.get("resumed", 0) + 1
    return partial


async def _ask_again(
    ex: Exchange, ticket: Inflight, stream: web.StreamResponse, failed: FailedBeforeBytes
) -> bool:
    """A continuation failed before it relayed a byte. When the engine failed with it in
    flight, the same rest is asked again (True); else the stream ends with the error event."""
    if not await ex.gate.engine_failed_with(ticket):
        await end_stream_with_error(stream, failed.message)
        return False
    ex.engine_failed()
    return True
