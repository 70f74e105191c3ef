"""The fixtures, all of them shared: the real vLLM (started once per session), gateways started
the way `vllm-guard run` starts them, a client session, and the tiny model's tokenizer. Plain
helpers are in tests/helpers.py, the real engine's process in tests/real_engine.py."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from engine.tokenization import PromptTokenizer
from gateway.app import create_app
from gateway.config import Config
from gateway.engine_wire import EngineWire
from gateway.keys import SUPERVISOR
from gateway.serve import listen
from tests.helpers import (
    MODEL_DIR,
    Gateway,
    RawEngine,
    RawHandler,
    StartGateway,
    StartRawEngine,
)
from tests.real_engine import ENGINE_PYTHON, RealEngine, start_engine, stop_process_group

ENGINE_TESTS = Path(__file__).resolve().parent / "engine"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests under tests/engine/ need the real vLLM: they carry the `engine` marker."""
    for item in items:
        if item.path.is_relative_to(ENGINE_TESTS):
            item.add_marker(pytest.mark.engine)


@pytest.fixture(scope="session")
def real_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealEngine]:
    """The real vLLM on the CPU with the tiny model, shared by the whole test session."""
    if not ENGINE_PYTHON.exists() or not MODEL_DIR.exists():
        pytest.fail("the engine is not installed: run `make engine model` (make test does)")
    log_path = tmp_path_factory.mktemp("engine") / "vllm.log"
    proc, url = start_engine(log_path)
    try:
        yield RealEngine(url=url, pid=proc.pid, log_path=log_path)
    finally:
        stop_process_group(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


@pytest.fixture
async def gateway_server() -> AsyncIterator[StartGateway]:
    """Start gateways from their config as `vllm-guard run` does (gateway.serve.listen: the
    same runner, sites and server settings; port 0 picks a free one), stopped after the test;
    by default wait until the engine behind them is ready."""
    started: list[Gateway] = []

    async def start(config: Config, *, wait_ready: bool = True, timeout: float = 120.0) -> Gateway:
        app = create_app(config)
        gateway = Gateway(await listen(app, config), config)
        started.append(gateway)
        if wait_ready:
            ok = await app[SUPERVISOR].wait_ready(timeout)
            assert ok, f"engine behind the gateway not ready: {app[SUPERVISOR].state}"
        return gateway

    yield start
    for gateway in reversed(started):
        await gateway.close()


@pytest.fixture
async def raw_engine() -> AsyncIterator[StartRawEngine]:
    """Start raw HTTP/1.1 engines (tests.helpers.RawEngine) on free ports, closed after the
    test."""
    started: list[RawEngine] = []

    async def start(handler: RawHandler) -> RawEngine:
        engine = await RawEngine(handler).start()
        started.append(engine)
        return engine

    yield start
    for engine in started:
        await engine.close()


@pytest.fixture
async def engine_wires() -> AsyncIterator[list[EngineWire]]:
    """The EngineWires a test appends here are closed after it."""
    made: list[EngineWire] = []
    yield made
    for wire in made:
        await wire.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for the test (no total timeout: each helper bounds its own wait)."""
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture(scope="session")
def tok() -> PromptTokenizer:
    """The tiny model's tokenizer, as the gateway counts with it."""
    if not (MODEL_DIR / "tokenizer.json").is_file():
        pytest.fail("models/tiny is missing: run `make model` (make test does)")
    return PromptTokenizer.from_dir(MODEL_DIR)
