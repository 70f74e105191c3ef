"""The client connection below the app: aiohttp's `RequestHandler` with what it lacks for a
server facing hostile clients, and the runner that uses it (`gateway.serve.listen`).

aiohttp bounds a connection's idle time (keep-alive) but not the time a client takes to send
its request headers: a client that sends a byte every few seconds (slowloris), or connects and
sends nothing, would hold a connection for the whole keep-alive. `GuardedProtocol` arms a timer
when a connection opens and when the first byte of a next request arrives, disarms it once the
parser has a whole request head, and closes the connection when it fires.

aiohttp also answers malformed HTTP (a bad method, Transfer-Encoding with Content-Length, a
header line over 8,190 bytes, more than 128 headers) with a plain-text 400 that echoes the
client's bytes, and logs a traceback: here the answer is the error envelope with a request id,
and the log one JSON line that names the error's class only.

The attributes of `RequestHandler` read here (`_request_count`, `_messages`,
`_request_in_progress`, `_loop`) are private to aiohttp 3.x; the tests of tests/emulator/
test_connections.py pin the behaviour over real sockets.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from gateway.errors import error_body
from gateway.requestlog import request_id_from

log = structlog.get_logger("gateway")

_MALFORMED = "The request is not valid HTTP/1.1"


def malformed_reason(exc: BaseException | None) -> str:
    """What was wrong with a request aiohttp could not parse, in words that never quote the
    client's bytes."""
    if isinstance(exc, BadHttpMethod):
        return f"{_MALFORMED}: the method is not a valid token."
    if isinstance(exc, LineTooLong):
        return f"{_MALFORMED}: a request or header line is over 8190 bytes."
    text = str(exc or "")
    if "Too many headers" in text:
        return f"{_MALFORMED}: more than 128 header lines."
    if "Transfer-Encoding" in text and "Content-Length" in text:
        return f"{_MALFORMED}: Transfer-Encoding and Content-Length together."
    return f"{_MALFORMED}."


class GuardedProtocol(RequestHandler):
    """One client connection: a bounded time to send each request's head, and malformed
    requests answered in the envelope."""

    header_timeout_s: float = 10.0

    def __init__(self, manager: web.Server, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        parsed_before = self._request_count
        idle = self._header_timer is None and not self._messages and not self._request_in_progress
        super().data_received(data)
        if self._request_count > parsed_before:
            self._disarm_header_timer()
        elif idle:
            # The first bytes of a next request on a kept-alive connection, its head not yet
            # whole (a head that arrives whole, the usual case, never needs the timer).
            self._arm_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._header_timer = self._loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport is None:
            return
        log.info(
            "connection_closed",
            reason="header_timeout",
            header_timeout_s=self.header_timeout_s,
            peer=_peer(self.transport),
        )
        self.force_close()
        self.transport.close()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request aiohttp could not parse (or a bug below the app): the envelope, one log
        line, the connection closed. `message` (which may quote the client) is not used."""
        request_id = request_id_from(None)
        if status == 500:
            text, type_ = (
                "The gateway failed on this request; this is a bug.",
                "InternalServerError",
            )
        else:
            text, type_ = malformed_reason(exc), "BadRequestError"
        log.info(
            "request_finished",
            request_id=request_id,
            outcome="rejected" if status < 500 else "error",
            reason="malformed_http",
            error=type(exc).__name__ if exc is not None else None,
            status=status,
            peer=_peer(self.transport),
        )
        if request.writer.output_size > 0:  # a response began: nothing more can be said
            raise ConnectionError("response already started")
        resp = web.Response(
            status=status,
            text=json.dumps(error_body(text, type_, None, status)),
            content_type="application/json",
            headers={"X-Request-Id": request_id},
        )
        resp.force_close()
        return resp


def _peer(transport: asyncio.BaseTransport | None) -> str | None:
    peer = None if transport is None else transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else None


class GuardedServer(web.Server):
    """aiohttp's `Server`, making `GuardedProtocol` connections."""

    header_timeout_s: float = 10.0

    def __call__(self) -> RequestHandler:
        return GuardedProtocol(
            self, loop=self._loop, header_timeout_s=self.header_timeout_s, **self._kwargs
        )


class GuardedRunner(web.AppRunner):
    """`web.AppRunner` whose server makes `GuardedProtocol` connections."""

    def __init__(self, app: web.Application, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout_s = header_timeout_s

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The app's own Server, with its handler and settings, made to build guarded
        # connections (aiohttp offers no hook for the protocol class).
        server.__class__ = GuardedServer
        assert isinstance(server, GuardedServer)
        server.header_timeout_s = self._header_timeout_s
        return server
