"""The gateway's own HTTP/1.1 client to the engine, for generation and the relayed routes.

aiohttp's client costs more per request than the whole rest of the relay (its request and
response machinery, timeouts, connector bookkeeping); talking to one co-located engine needs
far less. `EngineWire` keeps a pool of keep-alive connections to the engine's host and port
(no size limit; an idle one is dropped after `keepalive_timeout_s`, 4 s by default, or as
soon as the engine closed it) and writes each request head itself. Each connection
(gateway.wire_connection) is an asyncio `Protocol`
feeding `httptools.HttpResponseParser` (llhttp, in C): the response's head, its body with the
chunked framing decoded, and whether the engine keeps the connection alive. What the relay
gets is a `WireResponse`: status, headers, `read()` for a whole body, `chunks()` for a
stream's bytes as they arrive (exactly the bytes of the body), then `release()` (back to the
pool when the body was read to its end and the engine keeps the connection) or `close()`
(the connection dropped at once: how vLLM learns that the client went away).

Flow control: a connection stops reading from the engine once `HIGH_WATER` (64 KiB) bytes
wait for a slow consumer and reads again when the consumer took them, so a stream is never
buffered whole. A large request body is written in slices, waiting when the transport asks
to; an answer that comes before the body's end stops the write and the connection is not
reused.

Errors, each its own exception: `ConnectFailed` (refused, no route), `ConnectTimeout`,
`ClosedBeforeAnswer` (EOF, reset or a malformed head before the response head), `EngineCut`
(the response ended before its end: EOF or reset mid-body, a malformed body).

The one retry: a request sent on a pooled (reused) connection that the engine closed before
any byte of the response arrived is sent once more on a fresh connection. That is the classic
keep-alive race (the engine, uvicorn, closes a connection idle for 5 s just as the gateway
reuses it): the engine never saw that request. A fresh connection failing the same way is
never retried here: whether the engine failed with the request in flight is the gate's to
settle (gateway.exchange). An engine that died meanwhile refuses the retry's connection, which
the gate settles the same way.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Final
from urllib.parse import quote, urlsplit

from gateway.wire_connection import (
    ClosedBeforeAnswer,
    ConnectFailed,
    ConnectTimeout,
    EngineCut,
    WireConnection,
    WireError,
    WireResponse,
)

__all__ = [
    "ClosedBeforeAnswer",
    "ConnectFailed",
    "ConnectTimeout",
    "EngineCut",
    "EngineWire",
    "WireError",
    "WireResponse",
]

KEEPALIVE_TIMEOUT_S: Final = 4.0
"""An idle connection is dropped after this long: under uvicorn's 5 s, so that the gateway
rather than the engine ends it, which keeps the keep-alive race rare."""
# Request headers the client sets itself (or never sends on).
_OWN_HEADERS: Final = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "expect", "te"}
)
_TARGET_OK: Final = re.compile(r"[A-Za-z0-9/\-._~%:@!$&'()*+,;=]*")


class EngineWire:
    """A pool of HTTP/1.1 keep-alive connections to the engine at `url` (http://host:port)."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout_s: float | None,
        headers: Mapping[str, str] | None = None,
        keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"the engine's url must be http://host[:port], not {url!r}")
        self._host = parts.hostname
        self._port = parts.port or 80
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._host_line = f"Host: {host}:{self._port}\r\n" if parts.port else f"Host: {host}\r\n"
        # Sent unless the request has its own (a client's forwarded Authorization).
        self._defaults = {
            name.lower(): f"{name}: {value}\r\n" for name, value in (headers or {}).items()
        }
        self._connect_timeout_s = connect_timeout_s
        self._keepalive_timeout_s = keepalive_timeout_s
        self._idle: list[WireConnection] = []
        self._all: set[WireConnection] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False
        self._put_back = self.put_back

    async def request(
        self, method: str, path: str, body: bytes | None, headers: Mapping[str, str]
    ) -> WireResponse:
        """Send the request; the response once its head arrived. Raises `ConnectFailed`,
        `ConnectTimeout` or `ClosedBeforeAnswer`."""
        head = self._head(method, path, body, headers)
        head_only = method == "HEAD"
        conn = self._take_idle()
        if conn is not None:
            try:
                return await conn.exchange(head, body, head_only, self._put_back)
            except ClosedBeforeAnswer as err:
                if not err.nothing_received:
                    raise
                # The keep-alive race: the engine closed the idle connection as it was
                # reused, before reading the request. Once more, on a fresh connection.
        conn = await self._connect()
        return await conn.exchange(head, body, head_only, self._put_back)

    @property
    def idle(self) -> int:
        """Connections waiting in the pool."""
        return sum(1 for conn in self._idle if not conn.closed)

    async def close(self) -> None:
        """Close every connection."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
        for conn in list(self._all):
            conn.abort()
        self._idle.clear()
        await asyncio.sleep(0)  # the transports' connection_lost

    def put_back(self, conn: WireConnection) -> None:
        if self._closed:
            conn.abort()
            return
        loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        self._idle.append(conn)
        if self._sweep is None:
            self._sweep = loop.call_later(self._keepalive_timeout_s, self._drop_expired)

    def _take_idle(self) -> WireConnection | None:
        idle = self._idle
        if not idle:
            return None
        oldest = asyncio.get_running_loop().time() - self._keepalive_timeout_s
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if conn.idle_since < oldest:
                conn.abort()
                continue
            return conn
        return None

    def _drop_expired(self) -> None:
        self._sweep = None
        loop = asyncio.get_running_loop()
        oldest = loop.time() - self._keepalive_timeout_s
        kept = []
        for conn in self._idle:
            if conn.closed:
                continue
            if conn.idle_since < oldest:
                conn.abort()
            else:
                kept.append(conn)
        self._idle = kept
        if kept:
            self._sweep = loop.call_later(self._keepalive_timeout_s, self._drop_expired)

    async def _connect(self) -> WireConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _transport, conn = await loop.create_connection(
                    lambda: WireConnection(self._all.discard), self._host, self._port
                )
        except TimeoutError:
            raise ConnectTimeout(
                f"connecting to {self._host}:{self._port} took over {self._connect_timeout_s} s"
            ) from None
        except OSError as err:
            raise ConnectFailed(f"{self._host}:{self._port}: {err}") from None
        self._all.add(conn)
        return conn

    def _head(
        self, method: str, path: str, body: bytes | None, headers: Mapping[str, str]
    ) -> bytes:
        lines = [f"{method} {_target(path)} HTTP/1.1\r\n", self._host_line]
        defaults = self._defaults
        given: set[str] = set()
        for name, value in headers.items():
            lower = name.lower()
            if lower in _OWN_HEADERS:
                continue
            if lower in defaults:
                given.add(lower)
            lines.append(f"{name}: {value}\r\n")
        for lower, line in defaults.items():
            if lower not in given:
                lines.append(line)
        if body is not None:
            lines.append(f"Content-Length: {len(body)}\r\n")
        elif method in ("POST", "PUT", "PATCH"):
            lines.append("Content-Length: 0\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape")


@lru_cache(maxsize=256)
def _target(path: str) -> str:
    """The request target for `path` (decoded, as aiohttp gives it): percent-encoded where
    it must be."""
    if _TARGET_OK.fullmatch(path):
        return path
    return quote(path, safe="/%:@!$&'()*+,;=~")
