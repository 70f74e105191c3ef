"""The gateway's own HTTP/1.1 client to the engine (gateway.engine_wire), over real loopback
sockets against raw engines whose every byte the test writes: body framings, keep-alive reuse
and the one retry, cuts before and after the response head, a dropped connection seen by the
engine, and reading paused for a slow consumer."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
from collections.abc import Mapping

import aiohttp
import pytest

from gateway.engine_wire import (
    ClosedBeforeAnswer,
    ConnectFailed,
    EngineCut,
    EngineWire,
    WireResponse,
)
from gateway.errors import EngineFailed, EngineTimeout
from gateway.proxy import Upstream, response_headers
from gateway.wire_connection import HIGH_WATER, WireConnection
from tests.helpers import StartRawEngine, chunked, free_port, read_request, until

BOUND_S = 10.0
OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
"""A stream's response head; its chunks follow."""


def _wire(made: list[EngineWire], url: str, headers: Mapping[str, str] | None = None) -> EngineWire:
    wire = EngineWire(url, connect_timeout_s=2.0, headers=headers)
    made.append(wire)
    return wire


async def _post(wire: EngineWire, body: bytes = b"{}") -> WireResponse:
    return await wire.request("POST", "/v1/chat/completions", body, {"X-Request-Id": "r1"})


async def test_content_length_and_chunked_bodies_on_one_kept_alive_connection(
    raw_engine: StartRawEngine, engine_wires: list[EngineWire]
) -> None:
    """A Content-Length body and then a chunked one are read whole, exactly, over the same
    connection (the first went back to the pool); headers read case-insensitively."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK_HEAD + b'Content-Length: 11\r\nX-Engine: a\r\n\r\n{"one": 1}\n')
        await read_request(reader)
        writer.write(
            OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(b'{"two":', b" 2", b"}\r\n")
        )
        await reader.read()

    engine = await raw_engine(handler)
    wire = _wire(engine_wires, engine.url)
    first = await _post(wire)
    assert (first.status, first.content_type, first.headers["x-engine"]) == (
        200,
        "application/json",
        "a",
    )
    assert await first.read() == b'{"one": 1}\n'
    first.release()
    assert wire.idle == 1
    second = await _post(wire)
    assert await second.read() == b'{"two": 2}\r\n'
    assert "transfer-encoding" not in response_headers(second)
    second.release()
    assert engine.accepted == 1


async def test_request_head_carries_host_length_forwarded_and_default_headers(
    raw_engine: StartRawEngine, engine_wires: list[EngineWire]
) -> None:
    """The head names the host, the body's length and the forwarded headers; the default
    Authorization goes only when the request has none of its own; hop-by-hop ones never go."""
    heads: list[list[str]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            lines, body = await read_request(reader)
            heads.append(lines)
            writer.write(OK_HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    engine = await raw_engine(handler)
    wire = _wire(engine_wires, engine.url, headers={"Authorization": "Bearer engine-key"})
    for headers in ({"X-A": "1"}, {"authorization": "Bearer client", "Connection": "close"}):
        resp = await wire.request("POST", "/v1/completions", b"abc", headers)
        assert await resp.read() == b"abc"
        resp.release()
    port = engine.url.rsplit(":", 1)[1]
    first, second = ({h.split(":")[0].lower(): h for h in head[1:]} for head in heads)
    assert heads[0][0] == "POST /v1/completions HTTP/1.1"
    assert first["host"] == f"Host: 127.0.0.1:{port}"
    assert first["content-length"] == "Content-Length: 3"
    assert first["authorization"] == "Authorization: Bearer engine-key"
    assert first["x-a"] == "X-A: 1"
    assert second["authorization"] == "authorization: Bearer client"
    assert [h for h in heads[1] if h.lower().startswith("authorization")] == [
        "authorization: Bearer client"
    ]
    assert "connection" not in second


async def test_a_connection_the_engine_asks_to_close_is_not_reused(
    raw_engine: StartRawEngine, engine_wires: list[EngineWire]
) -> None:
    """An answer with `Connection: close` ends its connection: the next request opens another."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK_HEAD + b"Connection: close\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()

    engine = await raw_engine(handler)
    wire = _wire(engine_wires, engine.url)
    for _ in range(2):
        resp = await _post(wire)
        assert await resp.read() == b"{}"
        resp.release()
    assert engine.accepted == 2


def _connections() -> int:
    return sum(1 for o in gc.get_objects() if type(o) is WireConnection)


async def test_a_lost_connection_is_freed_by_reference_counting(
    raw_engine: StartRawEngine, engine_wires: list[EngineWire]
) -> None:
    """A connection the engine closed after its answer, and one dropped mid-stream, are freed
    once nothing refers to them, with the cyclic collector off: not left, with what they
    buffered, for its next full pass (which `vllm-guard run` makes rare)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lines, _ = await read_request(reader)
        if lines[0].startswith("POST /v1/completions "):
            writer.write(SSE_HEAD + b"6\r\ndata:1\r\n")
            await writer.drain()
            await reader.read()
            return
        writer.write(OK_HEAD + b"Connection: close\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()

    engine = await raw_engine(handler)
    wire = _wire(engine_wires, engine.url)
    gc.collect()
    assert _connections() == 0
    gc.disable()
    try:
        resp = await _post(wire)
        assert await resp.read() == b"{}"
        resp.release()
        stream = await wire.request("POST", "/v1/completions", b"{}", {})
        assert await anext(stream.chunks()) == b"data:1"
        assert _connections() == 2
        stream.close()
        del resp, stream
        assert await until(lambda: _connections() == 0, BOUND_S)
    finally:
        gc.enable()


async def test_a_pooled_connection_the_engine_closed_unanswered_is_retried_once(
    raw_engine: StartRawEngine, engine_wires: list[EngineWire]
) -> None:
    """The keep-alive race: the engine closes a reused connection without a byte of answer;
    the request goes once more on a fresh connection and is answered there."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK_HEAD + b"Content-Length: 2\r\n\r\n{}")
        await read_request(reader)  # the second request on this connection: dropped unanswered

    engine = await raw_engine(handler)
    wire = _wire(engine_wires, engine.url)
    first = await _post(wire)
    await first.read()
    first.release()
    second = await _post(wire)
    assert (second.status, await second.read()) == (200, b"{}")
    assert engine.accepted == 2


async def test_a_fresh_connection_closed_unanswered_is_not_retried(
    raw_engine: StartRawEngine, engine_wires: list[EngineWire]
) -> None:
    """An engine that drops a fresh connection after reading the request fails it at once:
    no second attempt (the gate settles whether the engine failed)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    engine = await raw_engine(handler)
    wire = _wire(engine_wires, engine.url)
    with pytest.raises(ClosedBeforeAnswer):
        await _post(wire)
    assert engine.accepted == 1


async def test_upstream_maps_a_reset_before_the_head_and_a_refused_connection(
    raw_engine: StartRawEngine, engine_wires: list[EngineWire], session: aiohttp.ClientSession
) -> None:
    """Through Upstream.open: a connection dropped before the head is "closed the connection
    before answering"; a refused one is "not reachable", without the engine's address."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.transport.abort()

    engine = await raw_engine(handler)
    upstream = Upstream(session, _wire(engine_wires, engine.url), engine.url, lambda: 1.0)
    with pytest.raises(EngineFailed, match="closed the connection before answering"):
        await upstream.open("POST", "/v1/completions", b"{}", {})
    port = free_port()
    refused_url = f"http://127.0.0.1:{port}"
    refused = Upstream(session, _wire(engine_wires, refused_url), refused_url, lambda: 1.0)
    with pytest.raises(EngineFailed, match="not reachable") as caught:
        await refused.open("POST", "/v1/completions", b"{}", {})
    assert str(port) not in caught.value.message
    with pytest.raises(ConnectFailed):
        await _post(_wire(engine_wires, refused_url))


async def test_eof_mid_body_is_a_cut_after_the_bytes_that_came(
    raw_engine: StartRawEngine, engine_wires: list[EngineWire]
) -> None:
    """A chunked stream the engine ends mid-body gives the bytes it sent, then `EngineCut`;
    a Content-Length body cut short makes `read()` raise `EngineCut`."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lines, _ = await read_request(reader)
        if lines[0].startswith("POST /stream"):
            writer.write(SSE_HEAD + b"5\r\ndata:\r\n")
        else:
            writer.write(OK_HEAD + b'Content-Length: 100\r\n\r\n{"cut')
        await writer.drain()

    engine = await raw_engine(handler)
    wire = _wire(engine_wires, engine.url)
    stream = await wire.request("POST", "/stream", b"{}", {})
    assert stream.content_type == "text/event-stream"
    chunks = stream.chunks()
    assert await anext(chunks) == b"data:"
    with pytest.raises(EngineCut):
        await anext(chunks)
    stream.release()  # not reusable: closed, not pooled
    assert wire.idle == 0
    whole = await wire.request("POST", "/whole", b"{}", {})
    with pytest.raises(EngineCut):
        await whole.read()
    whole.close()


async def test_close_drops_the_connection_for_the_engine_to_see(
    raw_engine: StartRawEngine, engine_wires: list[EngineWire]
) -> None:
    """`close()` mid-stream ends the connection at once: the engine reads EOF or a reset (how
    vLLM learns the client went away and aborts the generation)."""
    dropped = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(SSE_HEAD + b"6\r\ndata:1\r\n")
        await writer.drain()
        try:
            await reader.read()
        finally:
            dropped.set()

    engine = await raw_engine(handler)
    wire = _wire(engine_wires, engine.url)
    stream = await wire.request("POST", "/v1/completions", b"{}", {})
    assert await anext(stream.chunks()) == b"data:1"
    assert not dropped.is_set()
    stream.close()
    await asyncio.wait_for(dropped.wait(), BOUND_S)


async def test_a_slow_consumer_pauses_reading_and_gets_every_byte(
    raw_engine: StartRawEngine, engine_wires: list[EngineWire]
) -> None:
    """While the consumer takes nothing, the connection stops reading: the engine's writes
    block and what waits in the client stays near the high-water mark, not the whole body;
    once read, every byte arrives in order."""
    piece = bytes(range(256)) * 256  # 64 KiB
    pieces = 512  # 32 MiB: more than the kernel's socket buffers hold
    written = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        await read_request(reader)
        writer.write(SSE_HEAD)
        for _ in range(pieces):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            written += len(piece)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    engine = await raw_engine(handler)
    wire = _wire(engine_wires, engine.url)
    stream = await wire.request("POST", "/v1/completions", b"{}", {})
    assert await until(lambda: stream.buffered > HIGH_WATER, BOUND_S)
    await asyncio.sleep(0.5)  # the engine keeps writing until the buffers between are full
    assert written < pieces * len(piece)
    assert stream.buffered <= HIGH_WATER + (1 << 20)
    data = bytearray()
    async for chunk in stream.chunks():
        data += chunk
    assert data == piece * pieces
    stream.release()
    assert wire.idle == 1


async def test_a_large_request_body_arrives_whole(
    raw_engine: StartRawEngine, engine_wires: list[EngineWire]
) -> None:
    """A body of tens of MB is written in slices and reaches the engine byte for byte."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, body = await read_request(reader)
        answer = b"%d %d" % (len(body), sum(body[::4096]))
        writer.write(OK_HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer))
        await reader.read()

    engine = await raw_engine(handler)
    wire = _wire(engine_wires, engine.url)
    body = bytes(range(251)) * (24 * 4177)  # about 25 MB
    resp = await _post(wire, body)
    assert await resp.read() == b"%d %d" % (len(body), sum(body[::4096]))
    resp.release()


async def test_an_answer_before_the_whole_body_is_relayed_and_its_connection_dropped(
    raw_engine: StartRawEngine, engine_wires: list[EngineWire]
) -> None:
    """An engine that answers (413) without reading a large body gets its answer to the caller
    while the body is still being written, and that connection is not pooled (the body's rest
    would read as the next request)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        await reader.read()

    engine = await raw_engine(handler)
    wire = _wire(engine_wires, engine.url)
    resp = await asyncio.wait_for(_post(wire, b"x" * (64 << 20)), BOUND_S)
    assert (resp.status, await resp.read()) == (413, b"{}")
    resp.release()
    assert wire.idle == 0


async def test_a_connect_that_hangs_is_an_engine_timeout(
    engine_wires: list[EngineWire], session: aiohttp.ClientSession
) -> None:
    """A listener whose accept queue is full leaves the connect hanging: past
    `connect_timeout_s` Upstream.open raises `EngineTimeout` (504), not a hang."""
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):  # fill the accept queue: further SYNs are dropped
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        url = f"http://127.0.0.1:{port}"
        wire = EngineWire(url, connect_timeout_s=0.5)
        engine_wires.append(wire)
        upstream = Upstream(session, wire, url, lambda: 1.0)
        with pytest.raises(EngineTimeout):
            await asyncio.wait_for(upstream.open("POST", "/v1/completions", b"{}", {}), BOUND_S)
