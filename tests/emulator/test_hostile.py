"""One client cannot starve the others: a client that stops reading, one that takes every
slot, one without the engine's API key, over real sockets to the emulator."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer

from engine.emulator import EmulatorSettings, create_emulator_app
from gateway.app import create_app
from gateway.serve import listen
from tests.helpers import (
    StartGateway,
    base_url,
    free_port,
    gateway_config,
    run_fake_upstream,
    send,
)

BOUND_S = 20.0
"""A generous bound for what should happen after a timeout of about a second."""


@pytest.fixture
async def emulator() -> AsyncIterator[TestServer]:
    server = await run_fake_upstream(create_emulator_app(EmulatorSettings()))
    yield server
    await server.close()


async def _running_at(session: aiohttp.ClientSession, emulator: TestServer) -> float:
    async with session.get(emulator.make_url("/metrics")) as resp:
        text = await resp.text()
    match = re.search(r"^vllm:num_requests_running\{[^}]*\} (\S+)$", text, re.MULTILINE)
    assert match, text[:500]
    return float(match.group(1))


def _slow_reader(port: int, body: dict[str, Any]) -> socket.socket:
    """A client with a 4 KiB receive buffer that sends a request and never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(data) + data
    )
    return sock


async def test_a_client_that_stops_reading_is_cut(
    gateway_server: StartGateway, emulator: TestServer, session: aiohttp.ClientSession
) -> None:
    """A streaming client that reads nothing is cut after `client_write_timeout_s`: its slot
    is freed (the next client is served, not 429), its work at the engine is cancelled, and
    its log line says why."""
    config = gateway_config(
        base_url(emulator),
        server={"client_write_timeout_s": 1},
        defaults={"max_in_flight": 1},
        isolation={"queue_timeout_s": 1},
    )
    gateway = await gateway_server(config)
    body = {"model": "tiny", "prompt": ["a"] * 16, "n": 8, "max_tokens": 400, "stream": True}
    with structlog.testing.capture_logs() as logs:
        sock = await asyncio.to_thread(_slow_reader, gateway.listening.port, body)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + BOUND_S
            statuses = []
            while loop.time() < deadline:
                answer = await send(
                    session,
                    gateway.url + "/v1/completions",
                    {"model": "tiny", "prompt": "hi", "max_tokens": 2},
                )
                statuses.append(answer["status"])
                if answer["status"] == 200:
                    break
            assert statuses[-1] == 200, statuses
            assert await _running_at(session, emulator) == 0
        finally:
            sock.close()
    cut = [e for e in logs if e.get("reason") == "client_write_timeout"]
    assert len(cut) == 1, [e for e in logs if e["event"] == "request_finished"]
    assert cut[0]["outcome"] == "client_gone"


async def test_one_client_cannot_take_every_slot(
    gateway_server: StartGateway, emulator: TestServer
) -> None:
    """With `max_in_flight_per_client`, a client (by bearer token) past its share is
    answered 429 with Retry-After at once, while another client still gets a slot."""
    slow = await run_fake_upstream(create_emulator_app(EmulatorSettings(ttft_ms=1500)))
    try:
        config = gateway_config(
            base_url(slow), defaults={"max_in_flight": 4, "max_in_flight_per_client": 2}
        )
        gateway = await gateway_server(config)
        url = gateway.url + "/v1/completions"
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}

        async def as_client(token: str) -> dict[str, Any]:
            async with aiohttp.ClientSession() as s:
                return await send(s, url, body, headers={"Authorization": f"Bearer {token}"})

        greedy = [asyncio.create_task(as_client("greedy")) for _ in range(2)]
        await asyncio.sleep(0.5)  # both in flight at the engine (1.5 s to their first token)
        third, other = await asyncio.gather(as_client("greedy"), as_client("other"))
        assert third["status"] == 429
        assert int(third["headers"]["Retry-After"]) >= 1
        assert third["json"]["error"]["type"] == "RateLimitError"
        assert other["status"] == 200
        assert [t["status"] for t in await asyncio.gather(*greedy)] == [200, 200]
    finally:
        await slow.close()


async def test_api_keys_answer_401_before_the_body(
    gateway_server: StartGateway, emulator: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given the engine's keys (VLLM_API_KEY, and a variable named in config), a /v1 request
    without one of them is answered vLLM's own 401 before its body is read (even a body
    that is not JSON); with either key it passes; paths vLLM does not guard need none."""
    monkeypatch.setenv("VLLM_API_KEY", "key-one")
    monkeypatch.setenv("OTHER_KEY", "key-two")
    config = gateway_config(
        base_url(emulator), server={"api_key_env": ["VLLM_API_KEY", "OTHER_KEY"]}
    )
    gateway = await gateway_server(config)
    url = gateway.url + "/v1/completions"
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    async with aiohttp.ClientSession() as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "key-one"}):
            answer = await send(s, url, data=b"not json", headers=headers)
            assert answer["status"] == 401
            assert answer["json"] == {"error": "Unauthorized"}
        for key in ("key-one", "key-two"):
            ok = await send(s, url, body, headers={"Authorization": f"Bearer {key}"})
            assert ok["status"] == 200
        async with s.get(gateway.url + "/health") as resp:
            assert resp.status == 200
    await _refused_unread(gateway.listening.port)


async def _refused_unread(port: int) -> None:
    """A 401 does not wait for a body announced but never sent; the connection closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n{"
        )
        raw = b""
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(BOUND_S):
                while chunk := await reader.read(65536):
                    raw += chunk
        assert raw.startswith(b"HTTP/1.1 401")
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', "temperature"),
        (b'{"model": "tiny", "prompt": "hi", "top_p": Infinity}', "top_p"),
        (b'{"model": "tiny", "prompt": "hi", "logit_bias": {"5": -Infinity}}', "logit_bias.5"),
    ],
)
async def test_nan_and_infinity_are_refused(
    gateway_server: StartGateway, emulator: TestServer, raw: bytes, field: str
) -> None:
    """NaN and Infinity literals (which Python's parser accepts) are refused 400, naming the
    field, as strict JSON would; nothing reaches the engine."""
    gateway = await gateway_server(gateway_config(base_url(emulator)))
    async with aiohttp.ClientSession() as s:
        answer = await send(
            s,
            gateway.url + "/v1/completions",
            data=raw,
            headers={"Content-Type": "application/json"},
        )
    assert answer["status"] == 400
    error = answer["json"]["error"]
    assert error["param"] == field
    assert field in error["message"]


async def test_engine_down_does_not_tell_its_address(gateway_server: StartGateway) -> None:
    """While the engine is down, a relayed path answers 503 without the engine's address or
    port (they stay in the log)."""
    port = free_port()
    config = gateway_config(f"http://127.0.0.1:{port}")
    gateway = await gateway_server(config, wait_ready=False)
    with structlog.testing.capture_logs() as logs:
        async with aiohttp.ClientSession() as s, s.get(gateway.url + "/v1/models") as resp:
            assert resp.status == 503
            text = await resp.text()
    assert "127.0.0.1" not in text
    assert str(port) not in text
    assert any(str(port) in str(e.get("error")) for e in logs), logs


async def test_quarantine_clears_are_logged(emulator: TestServer) -> None:
    """Clearing the quarantine (all, or one fingerprint) on the admin port writes a log
    line saying how many entries went."""
    config = gateway_config(base_url(emulator), admin={"enabled": True, "port": 0})
    listening = await listen(create_app(config), config)
    try:
        admin = f"http://127.0.0.1:{listening.admin_port}/quarantine"
        with structlog.testing.capture_logs() as logs:
            async with aiohttp.ClientSession() as s, s.delete(admin) as resp:
                assert resp.status == 200
    finally:
        await listening.close()
    cleared = [e for e in logs if e["event"] == "admin_quarantine_cleared"]
    assert [e["cleared"] for e in cleared] == [0]


async def test_the_gateway_carries_the_key_to_an_engine_that_needs_it(
    gateway_server: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With VLLM_API_KEY set, the gateway's own probes and counts reach an engine that, like
    vLLM with --api-key, answers 401 under /v1 without it: the engine becomes ready and a
    client with the key is served."""
    monkeypatch.setenv("VLLM_API_KEY", "key-one")
    app = create_emulator_app(EmulatorSettings())

    @web.middleware
    async def vllm_auth(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/v1") and request.headers.get("Authorization") != (
            "Bearer key-one"
        ):
            return web.json_response({"error": "Unauthorized"}, status=401)
        response: web.StreamResponse = await handler(request)
        return response

    app.middlewares.append(vllm_auth)
    engine = await run_fake_upstream(app)
    try:
        gateway = await gateway_server(gateway_config(base_url(engine)), timeout=30)
        async with aiohttp.ClientSession() as s:
            answer = await send(
                s,
                gateway.url + "/v1/completions",
                {"model": "tiny", "prompt": "hi", "max_tokens": 2},
                headers={"Authorization": "Bearer key-one"},
            )
        assert answer["status"] == 200
    finally:
        await engine.close()
