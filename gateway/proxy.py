"""The relay to the engine: pooled keep-alive connections, bytes passed through as they come.

Generation and the relayed routes go through the gateway's own HTTP/1.1 client
(gateway.engine_wire); the small JSON exchanges (probes, /tokenize, /v1/models) through the
aiohttp session.

Non-streamed answers are JSON of bounded size and are read whole; an SSE stream is written to
the client chunk by chunk as the engine emits it and is never buffered. When the client goes
away (the handler is cancelled, or a write fails), the upstream connection is closed at once,
which is how vLLM learns to stop generating.

What happened at the engine is returned as a `RelayOutcome`: `Answered`, `FailedBeforeBytes`
(with the engine's own answer when it gave one) or `CutAfterBytes` (the client's open stream).
Exceptions are left for errors the middleware renders.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Final

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.engine_wire import (
    ClosedBeforeAnswer,
    ConnectFailed,
    ConnectTimeout,
    EngineCut,
    EngineWire,
    WireResponse,
)
from gateway.errors import (
    BadGateway,
    EngineErrored,
    EngineFailed,
    EngineTimeout,
    EngineUnavailable,
    EngineUnreachable,
    error_bytes,
)

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
log = structlog.get_logger("gateway")
_STREAM_BODY_BYTES: Final = 1 << 20  # aiohttp's TOO_LARGE_BYTES_BODY
# Response headers the gateway sets itself.
_RESPONSE_DROP: Final = HOP_BY_HOP | {"date", "server", "x-request-id"}


_NOT_FORWARDED: Final = HOP_BY_HOP | {"x-request-id"}


def forward_headers(headers: CIMultiDictProxy[str], request_id: str) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop ones (and those its Connection header names);
    Authorization passes (vLLM's --api-key); X-Request-Id is the gateway's sanitised one."""
    skip: frozenset[str] | set[str] = _NOT_FORWARDED
    if "Connection" in headers:
        skip = _NOT_FORWARDED | {
            token.strip().lower()
            for value in headers.getall("Connection")
            for token in value.split(",")
        }
    out: CIMultiDict[str] = CIMultiDict(
        [(name, value) for name, value in headers.items() if name.lower() not in skip]
    )
    out["X-Request-Id"] = request_id
    return out


_RESPONSE_DROP_RAW: Final = frozenset(name.encode() for name in _RESPONSE_DROP)


def response_headers(upstream: WireResponse) -> CIMultiDict[str]:
    """The engine's response headers minus hop-by-hop ones and those the gateway sets (names
    compared as the bytes they came in, ASCII case folded; only the kept ones decoded)."""
    return CIMultiDict(
        [
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
            for name, value in upstream.raw_headers
            if name.lower() not in _RESPONSE_DROP_RAW
        ]
    )


class ClientTooSlow(ConnectionResetError):
    """A write to the client did not complete within `server.client_write_timeout_s`: the
    client stopped reading. Handled as a client gone (the engine's side is closed, the
    bulkhead slot freed), and the connection is aborted."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"the client read nothing for {timeout_s:g} s")
        self.timeout_s = timeout_s


async def write_bounded(resp: web.StreamResponse, data: bytes, timeout_s: float | None) -> None:
    """`resp.write(data)`, waiting at most `timeout_s` for a client that does not read."""
    try:
        async with asyncio.timeout(timeout_s):
            await resp.write(data)
    except TimeoutError:
        raise ClientTooSlow(timeout_s or 0.0) from None


ProgressCallback = Callable[[bytes], None]
"""Told of every piece of the answer relayed to the client."""
Transform = Callable[[bytes], bytes]


class Upstream:
    """Where the engine answers, and how the gateway talks to it."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        wire: EngineWire,
        base_url: str,
        retry_after_s: Callable[[], float],
    ) -> None:
        self._session = session
        self._wire = wire
        self.base_url = base_url.rstrip("/")
        self._retry_after_s = retry_after_s

    async def open(
        self, method: str, path: str, body: bytes | None, headers: Mapping[str, str]
    ) -> WireResponse:
        """Send the request and return the engine's response once its head arrived."""
        try:
            return await self._wire.request(method, path, body, headers)
        except ConnectFailed as err:
            # The client is told what happened, never where the engine listens: the
            # address and the OS error stay in the log.
            log.warning("engine_unreachable", path=path, error=err.reason)
            raise EngineFailed(
                "The engine is not reachable; it may be starting or restarting."
            ) from None
        except ConnectTimeout:
            raise EngineTimeout("The engine did not answer in time.") from None
        except ClosedBeforeAnswer as err:
            log.warning("engine_disconnected", path=path, error=err.reason)
            raise EngineFailed(
                f"The engine closed the connection before answering ({err.reason})."
            ) from None

    async def json(
        self, method: str, path: str, payload: object | None = None, *, timeout: float
    ) -> tuple[int, object]:
        """A small JSON exchange with the engine (/tokenize, /version): its status and JSON
        answer. A 5xx is raised as `EngineErrored` whatever its body, to be settled as an
        engine failure."""
        body = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        try:
            async with self._session.request(
                method,
                self.base_url + path,
                data=_body_data(body),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                raw = await resp.read()
        except aiohttp.ClientConnectorError:
            raise EngineUnreachable(
                "The engine is not reachable.", retry_after_s=self._retry_after_s()
            ) from None
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise EngineTimeout("The engine did not answer in time.") from None
        except (
            aiohttp.ServerDisconnectedError,
            aiohttp.ClientOSError,
            aiohttp.ClientPayloadError,
        ) as err:
            raise EngineUnreachable(
                f"The engine failed to answer ({err}).", retry_after_s=self._retry_after_s()
            ) from None
        except aiohttp.ClientError as err:
            log.warning("engine_failed_to_answer", path=path, error=str(err))
            raise EngineUnavailable(
                f"The engine failed to answer ({type(err).__name__}).",
                retry_after_s=self._retry_after_s(),
            ) from None
        if resp.status >= 500:
            # Perhaps the engine died (vLLM answers a 500 after EngineDeadError, with or
            # without a body): the caller settles that, as it does the relay's
            # FailedBeforeBytes.
            log.warning("engine_answered_error", path=path, status=resp.status)
            raise EngineErrored(
                f"The engine answered HTTP {resp.status} to {method} {path}.",
                retry_after_s=self._retry_after_s(),
            )
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            raise BadGateway(
                f"The engine answered {resp.status} with a body that is not JSON."
            ) from None


def _body_data(body: bytes | None) -> bytes | io.BytesIO | None:
    """A body over 1 MB given as bytes makes aiohttp warn (ResourceWarning) that writing it in
    one go may block the loop; as a stream it is written in chunks."""
    return io.BytesIO(body) if body is not None and len(body) > _STREAM_BODY_BYTES else body


@dataclass(slots=True)
class Answered:
    """The engine answered and the client has (or is about to get) the whole answer."""

    response: web.StreamResponse


@dataclass(frozen=True, slots=True)
class FailedBeforeBytes:
    """The engine failed the exchange before the client saw a byte (refused, reset, cut before
    the first chunk, or a 5xx): it may be retried once the failure is settled."""

    message: str
    answer: web.Response | BadGateway | None = None
    """The engine's own answer (a 5xx), to relay if the engine turns out fine; the error it
    amounts to when its body is not JSON; None when it gave none."""


@dataclass(frozen=True, slots=True)
class CutAfterBytes:
    """The engine failed mid-stream after the client had bytes; `stream` is the client's
    (prepared, still open) response, for the caller to resume or end with an error event."""

    stream: web.StreamResponse


RelayOutcome = Answered | FailedBeforeBytes | CutAfterBytes
"""What happened at the engine, as the relay reports it."""


async def relay_response(
    request: web.Request,
    upstream: WireResponse,
    extra_headers: Mapping[str, str],
    on_progress: ProgressCallback | None = None,
    *,
    write_timeout_s: float | None = None,
) -> RelayOutcome:
    """Answer the client with the engine's response: a stream chunk by chunk (each write
    waiting at most `write_timeout_s`, else `ClientTooSlow`), anything else whole. Always
    releases the upstream connection; closes it unless the engine answered. Raises
    `BadGateway` for an engine error (4xx) whose body is not JSON."""
    outcome: RelayOutcome | None = None
    try:
        headers = response_headers(upstream)
        headers.update(extra_headers)
        if upstream.content_type == "text/event-stream":
            outcome = await _relay_stream(request, upstream, headers, on_progress, write_timeout_s)
        else:
            outcome = await _relay_whole(upstream, headers, on_progress)
        return outcome
    finally:
        _done_with(upstream, outcome)


def _done_with(upstream: WireResponse, outcome: RelayOutcome | None) -> None:
    if isinstance(outcome, Answered):
        upstream.release()
    else:
        # The client went away (cancelled handler, failed write) or the engine failed
        # mid-answer: drop the connection so the engine aborts the request.
        upstream.close()


_ENGINE_CUT = (EngineCut,)


async def _relay_whole(
    upstream: WireResponse,
    headers: CIMultiDict[str],
    on_progress: ProgressCallback | None,
) -> RelayOutcome:
    try:
        body = await upstream.read()
    except _ENGINE_CUT as err:
        return FailedBeforeBytes(f"The engine failed while answering ({err.reason}).")
    if on_progress is not None:
        on_progress(body)
    failure: BadGateway | None = None
    if upstream.status >= 400 and not _is_json(body):
        failure = BadGateway(
            f"The engine answered HTTP {upstream.status} with a body that is not JSON."
        )
    response = web.Response(status=upstream.status, body=body, headers=headers)
    if upstream.status >= 500:
        # Perhaps the engine died (vLLM answers a bare 500 after EngineDeadError): let the
        # caller settle that before relaying the answer.
        return FailedBeforeBytes(
            f"The engine answered HTTP {upstream.status}.", answer=failure or response
        )
    if failure is not None:
        raise failure
    return Answered(response)


async def _relay_stream(
    request: web.Request,
    upstream: WireResponse,
    headers: CIMultiDict[str],
    on_progress: ProgressCallback | None,
    write_timeout_s: float | None,
) -> RelayOutcome:
    # Nothing goes to the client before the engine's first chunk: a stream the engine cuts
    # before that can still be retried as if it never started.
    chunks = upstream.chunks()
    first = await _first_chunk(chunks)
    if isinstance(first, FailedBeforeBytes):
        return first
    resp = web.StreamResponse(status=upstream.status, headers=headers)
    await resp.prepare(request)
    if not await _pump(resp, chunks, first, None, on_progress, write_timeout_s):
        return CutAfterBytes(resp)
    await resp.write_eof()
    return Answered(resp)


async def continue_stream(
    resp: web.StreamResponse,
    upstream: WireResponse,
    transform: Transform,
    on_progress: ProgressCallback | None,
    *,
    write_timeout_s: float | None = None,
) -> RelayOutcome:
    """Relay a continuation into a stream the client already has open (see gateway.resume).
    Reports like `relay_response`; always releases or closes the upstream connection."""
    outcome: RelayOutcome | None = None
    try:
        chunks = upstream.chunks()
        first = await _first_chunk(chunks)
        if isinstance(first, FailedBeforeBytes):
            outcome = first
        elif not await _pump(resp, chunks, first, transform, on_progress, write_timeout_s):
            outcome = CutAfterBytes(resp)
        else:
            outcome = Answered(resp)
            await resp.write_eof()
        return outcome
    finally:
        _done_with(upstream, outcome)


async def _first_chunk(chunks: AsyncIterator[bytes]) -> bytes | FailedBeforeBytes:
    try:
        first = await anext(chunks, b"")
    except _ENGINE_CUT as err:
        return FailedBeforeBytes(f"The engine failed before the stream began ({err.reason}).")
    if not first:
        return FailedBeforeBytes("The engine ended the stream before sending anything.")
    return first


async def _pump(
    resp: web.StreamResponse,
    chunks: AsyncIterator[bytes],
    first: bytes,
    transform: Transform | None,
    on_progress: ProgressCallback | None,
    write_timeout_s: float | None,
) -> bool:
    """Relay chunks until the engine's stream ends (True) or the engine cuts it (False).
    A client that takes no bytes for `write_timeout_s` raises `ClientTooSlow`."""
    chunk = first
    try:
        while chunk:
            out = chunk if transform is None else transform(chunk)
            if on_progress is not None:
                on_progress(out)
            if out:
                await write_bounded(resp, out, write_timeout_s)
            chunk = await anext(chunks, b"")
    except _ENGINE_CUT:
        return False
    return True


def engine_answer(failed: FailedBeforeBytes, retry_after_s: float) -> web.StreamResponse:
    """What to answer for an exchange that failed while the engine itself stayed fine: the
    engine's own response when it gave one, else the error it amounts to (raised)."""
    if isinstance(failed.answer, web.Response):
        return failed.answer
    if failed.answer is not None:
        raise failed.answer
    raise EngineUnavailable(failed.message, retry_after_s=retry_after_s)


async def end_stream_with_error(resp: web.StreamResponse, message: str) -> None:
    """End a started stream the way vLLM reports an error inside one: a `data:` event with
    the error envelope, then `[DONE]`, so the client reads a reason, not a cut connection."""
    await resp.write(
        b"data: "
        + error_bytes(message, "ServiceUnavailableError", None, 503)
        + b"\n\ndata: [DONE]\n\n"
    )
    await resp.write_eof()


def _is_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except ValueError:
        return False
    return True
