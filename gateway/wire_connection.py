"""One keep-alive HTTP/1.1 connection to the engine (`WireConnection`, an asyncio Protocol
feeding `httptools.HttpResponseParser`) and the response read through it (`WireResponse`).
The pool that owns the connections is gateway.engine_wire.

The parser (llhttp, in C) gives the response's head, its body with the chunked framing
decoded, and whether the engine keeps the connection alive. A connection stops reading from
the engine once `HIGH_WATER` bytes of body wait for a slow consumer and reads again when the
consumer took them, so a stream is never buffered whole. A large request body is written in
slices, waiting whenever the transport asks to.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterator
from typing import Final, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

HIGH_WATER: Final = 64 * 1024
"""Bytes buffered for a consumer past which the connection stops reading from the engine."""
_ONE_WRITE: Final = 64 * 1024  # a body up to this goes in the head's write
_BODY_SLICE: Final = 1 << 20


class WireError(Exception):
    """The exchange with the engine failed; `reason` says how (for logs and messages)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConnectFailed(WireError):
    """No connection to the engine (refused, unreachable); the reason holds the OS error."""


class ConnectTimeout(WireError):
    """Connecting to the engine took longer than the connect timeout."""


class ClosedBeforeAnswer(WireError):
    """The connection ended before the response head arrived."""

    def __init__(self, reason: str, *, nothing_received: bool) -> None:
        super().__init__(reason)
        self.nothing_received = nothing_received


class EngineCut(WireError):
    """The response ended before its end (after its head)."""


def _why(exc: BaseException | None) -> str:
    return "EOF" if exc is None else type(exc).__name__


class WireConnection(asyncio.Protocol):
    """One keep-alive connection to the engine: one exchange at a time."""

    def __init__(self, on_lost: Callable[[WireConnection], None]) -> None:
        self._on_lost = on_lost
        # The parser calls back into this connection: a cycle, broken when the connection is
        # lost, so that a closed connection (and what it buffered) is freed by its last
        # reference going, not at the cyclic collector's next full pass, rare by design
        # (gateway.serve.tune_collector).
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._busy = False
        self._head: asyncio.Future[None] | None = None
        self._raw: list[tuple[bytes, bytes]] = []
        self._status = 0
        self._interim = False
        self._head_only = False
        self._until_eof = False
        self._got_bytes = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._complete = False
        self._keep_alive = False
        self._keep_alive_ok = True  # False once a body was left half-sent (answered early)
        self._error: WireError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._drained: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, though they are one.
        self._transport = cast("asyncio.Transport", transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._parser = None
        self._on_lost(self)
        self._wake_writer()
        if not self._busy:
            return
        head = self._head
        if head is not None and not head.done():
            head.set_exception(ClosedBeforeAnswer(_why(exc), nothing_received=not self._got_bytes))
        elif not self._complete and self._error is None:
            if self._until_eof and exc is None:
                self._complete = True  # a body framed by the end of the connection
            else:
                self._error = EngineCut(_why(exc))
            self._wake()

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if not self._busy or parser is None:  # bytes nobody asked for: not to be trusted
            self.abort()
            return
        self._got_bytes = True
        try:
            parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as err:
            self._malformed(type(err).__name__)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_writer()

    # -- httptools callbacks -------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None  # called back by the parser, inside data_received
        status = parser.get_status_code()
        if status < 200:  # an interim answer (100 Continue): the real one follows
            self._interim = True
            self._raw = []
            return
        self._status = status
        framed = status in (204, 304)
        for name, _value in self._raw:
            if name.lower() in (b"content-length", b"transfer-encoding"):
                framed = True
        self._until_eof = not framed
        if self._head_only:  # an answer to HEAD has no body, whatever its headers say
            self._complete = True
        head = self._head
        if head is not None and not head.done():
            head.set_result(None)
            self._wake_writer()  # a body still being written stops: the engine answered

    def on_body(self, body: bytes) -> None:
        if self._head_only:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._reading_paused:
            assert self._transport is not None
            self._transport.pause_reading()
            self._reading_paused = True
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._complete = True
        parser = self._parser
        assert parser is not None  # called back by the parser, inside data_received
        self._keep_alive = parser.should_keep_alive() and not self._head_only
        self._wake()

    # -- one exchange --------------------------------------------------------------------------

    async def exchange(
        self,
        head: bytes,
        body: bytes | None,
        head_only: bool,
        give_back: Callable[[WireConnection], None],
    ) -> WireResponse:
        """Send the request; the response once its head arrived. Raises `ClosedBeforeAnswer`."""
        transport = self._transport
        assert transport is not None
        assert not self._busy
        self._busy, self._head_only = True, head_only
        self._raw, self._status, self._interim, self._got_bytes = [], 0, False, False
        self._complete, self._keep_alive, self._error = False, False, None
        self._keep_alive_ok = True
        waiter = self._head = asyncio.get_running_loop().create_future()
        try:
            if body is None or len(body) <= _ONE_WRITE:
                transport.write(head if body is None else head + body)
            else:
                transport.write(head)
                await self._write_body(body)
            await waiter
        except BaseException:
            self.abort()
            raise
        finally:
            self._head = None
        return WireResponse(self, self._status, self._raw, give_back)

    async def _write_body(self, body: bytes) -> None:
        assert self._transport is not None
        assert self._head is not None
        view = memoryview(body)
        for start in range(0, len(view), _BODY_SLICE):
            if self.closed or self._head.done():  # lost, or answered early (413)
                self._keep_alive_ok = False  # the rest of the body would read as a request
                return
            self._transport.write(view[start : start + _BODY_SLICE])
            if self._writing_paused and not self.closed:
                self._drained = asyncio.get_running_loop().create_future()
                try:
                    await self._drained
                finally:
                    self._drained = None

    async def next_chunk(self) -> bytes:
        """The body's bytes that arrived since the last call (waiting for some); b"" at its
        end. Raises `EngineCut` once the bytes that did arrive were taken."""
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                if self._reading_paused and not self.closed:
                    assert self._transport is not None
                    self._transport.resume_reading()
                    self._reading_paused = False
                return data
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    @property
    def buffered(self) -> int:
        """Bytes of the body received and not yet taken."""
        return self._buffered

    def reusable(self) -> bool:
        """The exchange ended cleanly and the engine keeps the connection."""
        return (
            self._complete
            and self._keep_alive
            and self._keep_alive_ok
            and self._error is None
            and not self._chunks
            and not self.closed
        )

    def finish(self) -> None:
        """The exchange is over (before the connection goes back to the pool)."""
        self._busy = False

    def abort(self) -> None:
        """Drop the connection at once."""
        self._busy = False
        if not self.closed and self._transport is not None:
            self._transport.abort()
        self.closed = True

    def _malformed(self, reason: str) -> None:
        head = self._head
        if head is not None and not head.done():
            head.set_exception(ClosedBeforeAnswer(reason, nothing_received=False))
            self._wake_writer()
        elif self._error is None and not self._complete:
            self._error = EngineCut(reason)
            self._wake()
        self.abort()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_writer(self) -> None:
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)


class WireResponse:
    """The engine's response, once its head arrived. Ends with `release()` or `close()`."""

    __slots__ = ("_conn", "_give_back", "_headers", "_raw", "content_type", "status")

    def __init__(
        self,
        conn: WireConnection,
        status: int,
        raw: list[tuple[bytes, bytes]],
        give_back: Callable[[WireConnection], None],
    ) -> None:
        self._conn = conn
        self._give_back: Callable[[WireConnection], None] | None = give_back
        self.status = status
        self._raw = raw
        self._headers: CIMultiDictProxy[str] | None = None
        content_type = "application/octet-stream"
        for name, value in raw:
            if name.lower() == b"content-type":
                content_type = value.decode("latin-1").partition(";")[0].strip().lower()
        self.content_type = content_type

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """The response's header lines as they came, in order (names as the engine wrote
        them)."""
        return self._raw

    def header_items(self) -> Iterator[tuple[str, str]]:
        """The response's headers in order, as sent (names as the engine wrote them)."""
        for name, value in self._raw:
            yield (
                name.decode("utf-8", "surrogateescape"),
                value.decode("utf-8", "surrogateescape"),
            )

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        if self._headers is None:
            self._headers = CIMultiDictProxy(CIMultiDict(self.header_items()))
        return self._headers

    async def read(self) -> bytes:
        """The whole body. Raises `EngineCut`."""
        parts = []
        while chunk := await self._conn.next_chunk():
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def chunks(self) -> _Chunks:
        """The body's bytes as they arrive. Raises `EngineCut`."""
        return _Chunks(self._conn)

    @property
    def buffered(self) -> int:
        """Bytes received from the engine that the consumer has not taken yet."""
        return self._conn.buffered

    def release(self) -> None:
        """Done with the response: its connection goes back to the pool when the body was
        read to its end and the engine keeps it alive, else it is closed."""
        conn, give_back = self._conn, self._give_back
        if give_back is not None and conn.reusable():
            self._give_back = None
            conn.finish()
            give_back(conn)
        else:
            self.close()

    def close(self) -> None:
        """Drop the connection at once (the engine sees the client go away)."""
        self._give_back = None
        self._conn.abort()


class _Chunks:
    """An async iterator over a body's bytes as they arrive."""

    __slots__ = ("_conn",)

    def __init__(self, conn: WireConnection) -> None:
        self._conn = conn

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._conn.next_chunk()
        if not chunk:
            raise StopAsyncIteration
        return chunk
