"""Connections from hostile clients, over raw sockets to a gateway started by the one server
builder (gateway.serve.listen): a header slowloris, a silent connection, an idle keep-alive,
a slow body, a gzip bomb, an `Expect: 100-continue` over the limit, and malformed HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import structlog
from aiohttp.test_utils import TestServer

from engine.emulator import EmulatorSettings, create_emulator_app
from tests.helpers import Gateway, StartGateway, base_url, gateway_config, run_fake_upstream

BOUND_S = 10.0
"""A generous bound for what should happen after a timeout of about a second."""


@pytest.fixture
async def emulator() -> AsyncIterator[TestServer]:
    server = await run_fake_upstream(create_emulator_app(EmulatorSettings()))
    yield server
    await server.close()


async def _gateway(
    gateway_server: StartGateway, emulator: TestServer, **server: Any
) -> tuple[Gateway, int]:
    config = gateway_config(base_url(emulator), server=server)
    gateway = await gateway_server(config)
    return gateway, gateway.listening.port


async def _closed_within(reader: asyncio.StreamReader, timeout: float) -> bytes | None:
    """What the server sent before closing the connection, or None if it stayed open."""
    received = b""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    with contextlib.suppress(TimeoutError, ConnectionError):
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), deadline - loop.time())
            if not chunk:
                return received
            received += chunk
    return None if loop.time() >= deadline else received


def _answer(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


async def test_header_slowloris_is_cut(gateway_server: StartGateway, emulator: TestServer) -> None:
    """A client sending its headers a byte at a time is cut after `header_timeout_s`, though
    each byte comes well within the keep-alive."""
    _, port = await _gateway(gateway_server, emulator, header_timeout_s=1, keepalive_timeout_s=60)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BOUND_S
        closed = False
        while loop.time() < deadline and not closed:
            try:
                writer.write(b"X")
                await writer.drain()
            except ConnectionError:
                closed = True
                break
            with contextlib.suppress(TimeoutError):
                closed = await asyncio.wait_for(reader.read(1), 0.3) == b""
        assert closed, "a slowloris kept its connection"
    finally:
        writer.close()


async def test_a_kept_alive_connections_next_head_is_timed(
    gateway_server: StartGateway, emulator: TestServer
) -> None:
    """On a kept-alive connection, a next request whose head arrives whole is answered however
    long the connection idled before it (past `header_timeout_s`: no timer ran while idle);
    a next head left unfinished is cut after `header_timeout_s`."""
    _, port = await _gateway(gateway_server, emulator, header_timeout_s=1, keepalive_timeout_s=60)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(2):
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND_S)
            assert head.startswith(b"HTTP/1.1 200")
            length = int(_answer(head)[1]["content-length"])
            await asyncio.wait_for(reader.readexactly(length), BOUND_S)
            await asyncio.sleep(1.5)  # idle past header_timeout_s, within the keep-alive
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finished
        assert await _closed_within(reader, BOUND_S) == b"", (
            "an unfinished head kept its connection"
        )
    finally:
        writer.close()


async def test_silent_connection_is_cut(gateway_server: StartGateway, emulator: TestServer) -> None:
    """A connection that never sends a byte is closed after `header_timeout_s`."""
    _, port = await _gateway(gateway_server, emulator, header_timeout_s=1, keepalive_timeout_s=60)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert await _closed_within(reader, BOUND_S) == b""
    finally:
        writer.close()


async def test_idle_keepalive_is_closed(gateway_server: StartGateway, emulator: TestServer) -> None:
    """After an answer, a kept-alive connection left idle is closed after
    `keepalive_timeout_s` (aiohttp's own default is an hour)."""
    _, port = await _gateway(gateway_server, emulator, header_timeout_s=60, keepalive_timeout_s=1)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND_S)
        assert head.startswith(b"HTTP/1.1 200")
        rest = await _closed_within(reader, BOUND_S)
        assert rest is not None, "an idle keep-alive stayed open"
    finally:
        writer.close()


async def test_slow_body_gets_408(gateway_server: StartGateway, emulator: TestServer) -> None:
    """A body that does not arrive within `body_timeout_s` is answered 408 in the envelope,
    and the connection closes."""
    _, port = await _gateway(gateway_server, emulator, body_timeout_s=1)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"model": '
        )
        raw = await _closed_within(reader, BOUND_S)
        assert raw is not None
        status, headers, body = _answer(raw)
        assert status == 408
        assert json.loads(body)["error"]["code"] == 408
        assert headers["x-request-id"]
    finally:
        writer.close()


@pytest.mark.parametrize(("size", "status"), [(900, 200), (5000, 413)])
async def test_a_body_after_its_head_is_bounded_like_one_with_it(
    gateway_server: StartGateway, emulator: TestServer, size: int, status: int
) -> None:
    """A body that arrives after its head, in two parts, is read to its end and bounded by
    `max_body_bytes` like one that came with the head: within it, answered; past it, 413."""
    _, port = await _gateway(gateway_server, emulator, max_body_bytes=1000)
    prompt = "x" * (size - len(json.dumps({"model": "tiny", "max_tokens": 1, "prompt": ""})))
    body = json.dumps({"model": "tiny", "max_tokens": 1, "prompt": prompt}).encode()
    assert len(body) == size
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % size
        )
        await writer.drain()
        for part in (body[: size // 2], body[size // 2 :]):
            await asyncio.sleep(0.2)
            writer.write(part)
            await writer.drain()
        raw = await _closed_within(reader, BOUND_S)
        assert raw is not None
        got, _, answer = _answer(raw)
        assert got == status
        if status == 413:
            assert json.loads(answer)["error"]["code"] == 413
    finally:
        writer.close()


def _gzip_bomb(inflated_mib: int) -> bytes:
    """A gzip body of zeros inflating to `inflated_mib` MiB (about 1/1000 of that sent)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    return b"".join(packer.compress(zeros) for _ in range(inflated_mib)) + packer.flush()


async def test_gzip_bomb_is_refused_unread(
    gateway_server: StartGateway, emulator: TestServer
) -> None:
    """A gzip body (256 MiB inflated, a quarter MiB sent) is answered 415 without being
    inflated, and the connection is closed after the answer instead of read on."""
    _, port = await _gateway(gateway_server, emulator)
    bomb = _gzip_bomb(256)
    assert len(bomb) < 4 << 20
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(bomb)
        )
        writer.write(bomb[:4096])  # the rest is never sent: the answer must not wait for it
        raw = await _closed_within(reader, BOUND_S)
        assert raw is not None, "the connection stayed open after the refusal"
        status, headers, body = _answer(raw)
        assert status == 415
        error = json.loads(body)["error"]
        assert error["type"] == "UnsupportedMediaTypeError"
        assert headers["x-request-id"]
    finally:
        writer.close()


async def test_small_gzip_chat_is_refused(
    gateway_server: StartGateway, emulator: TestServer
) -> None:
    """A small gzip chat body is refused 415 too (never forwarded inflated with its
    Content-Encoding still set)."""
    _, port = await _gateway(gateway_server, emulator)
    body = zlib.compress(
        json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}).encode(),
        wbits=31,
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        raw = await _closed_within(reader, BOUND_S)
        assert raw is not None
        assert _answer(raw)[0] == 415
    finally:
        writer.close()


async def test_expect_continue_over_the_limit_gets_413_at_once(
    gateway_server: StartGateway, emulator: TestServer
) -> None:
    """`Expect: 100-continue` with a Content-Length over max_body_bytes is answered 413 in
    the envelope instead of `100 Continue`, and the connection closes."""
    _, port = await _gateway(gateway_server, emulator, max_body_bytes=1000)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: 5000000\r\n\r\n"
        )
        raw = await _closed_within(reader, BOUND_S)
        assert raw is not None
        status, headers, body = _answer(raw)
        assert status == 413
        assert json.loads(body)["error"]["code"] == 413
        assert headers["x-request-id"]
    finally:
        writer.close()


MARKER = b"ECHOME"
MALFORMED = {
    "bad method": b"G{ECHOME}T / HTTP/1.1\r\nHost: x\r\n\r\n",
    "te with cl": (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\nX-ECHOME: 1\r\n\r\n0\r\n\r\n"
    ),
    "long header": b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + MARKER * 1500 + b"\r\n\r\n",
    "many headers": b"GET / HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"X-ECHOME-%d: 1\r\n" % i for i in range(130))
    + b"\r\n",
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_http_gets_the_envelope(
    gateway_server: StartGateway,
    emulator: TestServer,
    raw: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Malformed HTTP is answered 400 in the error envelope with an X-Request-Id, without
    echoing the client's bytes; it logs one JSON line and no traceback."""
    _, port = await _gateway(gateway_server, emulator)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        with structlog.testing.capture_logs() as logs, caplog.at_level(logging.DEBUG):
            writer.write(raw)
            answer = await _closed_within(reader, BOUND_S)
        assert answer is not None
        status, headers, body = _answer(answer)
        assert status == 400
        assert headers["x-request-id"]
        assert headers["content-type"].startswith("application/json")
        assert MARKER not in answer
        assert json.loads(body)["error"]["code"] == 400
    finally:
        writer.close()
    lines = [e for e in logs if e["event"] == "request_finished"]
    assert len(lines) == 1
    assert lines[0]["reason"] == "malformed_http"
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
