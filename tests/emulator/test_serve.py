"""The one server builder (gateway.serve.listen), which `vllm-guard run` and every test gateway
use: the client and admin listeners apart, the bound ports, and a close that stops the engine
supervision with the app."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from engine.emulator import EmulatorSettings, create_emulator_app
from engine.state import EngineState
from gateway.app import create_app
from gateway.keys import SUPERVISOR
from gateway.serve import listen
from tests.helpers import base_url, error_envelope, gateway_config, port_open, run_fake_upstream


@pytest.fixture
async def emulator() -> AsyncIterator[TestServer]:
    server = await run_fake_upstream(create_emulator_app(EmulatorSettings()))
    yield server
    await server.close()


async def test_client_and_admin_listeners_are_apart(
    emulator: TestServer, session: aiohttp.ClientSession
) -> None:
    """Port 0 binds a free port for each listener; the operator's paths answer on the admin
    port only, the client port refuses them in the error envelope."""
    config = gateway_config(base_url(emulator), admin={"enabled": True, "port": 0})
    listening = await listen(create_app(config), config)
    try:
        assert listening.port > 0
        assert listening.admin_port not in {None, 0, listening.port}
        admin = f"http://127.0.0.1:{listening.admin_port}/quarantine"
        async with session.get(admin) as resp:
            assert resp.status == 200
            assert (await resp.json())["quarantine"] == []
        async with session.get(f"http://127.0.0.1:{listening.port}/quarantine") as resp:
            assert resp.status == 404
            error_envelope(await resp.json(), 404)
    finally:
        await listening.close()


async def test_without_admin_only_the_client_port_listens(emulator: TestServer) -> None:
    """With the admin listener disabled, listen() starts the client listener alone."""
    config = gateway_config(base_url(emulator))
    listening = await listen(create_app(config), config)
    try:
        assert listening.admin_port is None
        assert port_open(listening.port)
    finally:
        await listening.close()


async def test_close_frees_the_port_and_stops_supervision(emulator: TestServer) -> None:
    """Closing stops listening and runs the app's cleanup: the supervisor is stopped."""
    config = gateway_config(base_url(emulator))
    app = create_app(config)
    listening = await listen(app, config)
    port = listening.port
    assert await app[SUPERVISOR].wait_ready(30)
    await listening.close()
    assert app[SUPERVISOR].state is EngineState.STOPPED
    assert not port_open(port)
