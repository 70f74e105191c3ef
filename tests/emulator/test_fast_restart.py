"""A fast restart in the sidecar shape: the engine container is killed and started again
within a second or so, faster than `/health` failures could fail it. The gateway still sees
an engine failure (a refused connection followed by a healthy probe, or /metrics counters gone
backwards), retries or resumes what was in flight, holds what comes meanwhile, and reads the
engine's facts again."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from engine.process import EngineProcess
from engine.state import EngineState
from engine.supervisor import EngineSupervisor
from gateway.keys import INFLIGHT, SUPERVISOR
from tests.helpers import (
    CHAT_PATH,
    MODEL_DIR,
    Recorder,
    base_url,
    chat,
    free_port,
    gateway_config,
    send,
    stream_summary,
    until,
)

TIMINGS: dict[str, Any] = {
    "probe_interval_s": 0.3,
    "startup_probe_interval_s": 0.3,
    "probe_timeout_s": 3,
    # A restart of a second or so never fails 100 /health probes in a row (30 s): only the
    # restart evidence can tell the gateway that its engine is a new one.
    "health_failures": 100,
    "wedge_timeout_s": 30,
    "sidecar_hold_s": 30,
}


class Kubelet:
    """Runs the sidecar engine (the emulator) on a fixed port and restarts it at once."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.runs: list[EngineProcess] = []

    async def start(self, *flags: str, name: str = "tiny") -> None:
        argv = [
            sys.executable,
            "-m",
            "engine.emulator",
            "--port",
            str(self.port),
            "--served-model-name",
            name,
            "--tokenizer",
            str(MODEL_DIR),
            *flags,
        ]
        self.runs.append(await EngineProcess.spawn(argv, grace_s=2.0))

    async def kill_and_restart(self, *flags: str, name: str = "tiny") -> None:
        """SIGKILL the engine's process group and start the next one at once."""
        os.killpg(self.runs[-1].pid, signal.SIGKILL)
        await self.runs[-1].wait()
        await self.start(*flags, name=name)

    async def stop(self) -> None:
        for run in self.runs:
            await run.stop(2.0)


@pytest.fixture
async def kubelet() -> AsyncIterator[Kubelet]:
    k = Kubelet()
    yield k
    await k.stop()


def _config(kubelet: Kubelet) -> Any:
    return gateway_config(
        kubelet.url,
        engine={**TIMINGS, "url": kubelet.url},
        models={"tiny": {"tokenizer": str(MODEL_DIR), "token_source": "local", "deadline_s": 90}},
        isolation={"probation_timeout_s": 20, "queue_timeout_s": 60},
    )


async def test_in_flight_requests_survive_a_fast_sidecar_restart(
    gateway_server: Any, kubelet: Kubelet
) -> None:
    """Two streams under way and two non-streamed chats in flight when the sidecar engine is
    SIGKILLed and started again at once all get their whole answer: the non-streamed ones are
    retried, the streams resumed as one continuous answer."""
    await kubelet.start("--tokens-per-second", "20")
    server = await gateway_server(_config(kubelet), timeout=60)
    base = base_url(server)
    supervisor: EngineSupervisor = server.app[SUPERVISOR]
    recorder = Recorder(supervisor)
    ledger = server.app[INFLIGHT]
    bodies = [chat(f"request number {i}", max_tokens=60, stream=i < 2) for i in range(4)]
    async with aiohttp.ClientSession() as session:
        running = [asyncio.ensure_future(send(session, base + CHAT_PATH, b, 90)) for b in bodies]
        # All four at the engine, and both streams have sent their client some bytes.
        assert await until(
            lambda: len(ledger) == 4 and sum(t.bytes_received > 0 for t in ledger) >= 2, 30
        )
        await kubelet.kill_and_restart("--tokens-per-second", "20")
        results = await asyncio.wait_for(asyncio.gather(*running), 60)
        expected = []
        for body in bodies:
            again = await send(session, base + CHAT_PATH, {**body, "stream": False})
            expected.append(again["json"]["choices"][0]["message"]["content"])
    for body, result, answer in zip(bodies, results, expected, strict=True):
        assert result["status"] == 200, result
        if body.get("stream"):
            summary = stream_summary(result["events"])
            assert summary["error"] is None, summary
            assert summary["text"] == answer
            assert summary["done"]
            assert len(summary["ids"]) == 1
        else:
            assert result["json"]["choices"][0]["message"]["content"] == answer
            assert result["json"]["usage"]["completion_tokens"] == 60
    failed = recorder.reasons(EngineState.FAILED)
    assert len(failed) == 1
    assert "restarted without the gateway seeing it" in failed[0]
    assert supervisor.epoch == 2


async def test_facts_are_read_again_after_a_fast_restart(
    gateway_server: Any, kubelet: Kubelet
) -> None:
    """An idle sidecar engine restarted within a second under another served model name is
    seen as a new engine: its model list is read again, the new name is served and the old
    one is a 404 that names the new alias."""
    await kubelet.start()
    server = await gateway_server(_config(kubelet), timeout=60)
    base = base_url(server)
    supervisor: EngineSupervisor = server.app[SUPERVISOR]
    async with aiohttp.ClientSession() as session:
        assert (await send(session, base + CHAT_PATH, chat("before")))["status"] == 200
        await kubelet.kill_and_restart(name="renamed")
        assert await until(lambda: supervisor.epoch == 2 and supervisor.is_ready(), 30)
        renamed = await send(session, base + CHAT_PATH, {**chat("after"), "model": "renamed"})
        old = await send(session, base + CHAT_PATH, chat("after"))
    assert renamed["status"] == 200
    assert old["status"] == 404
    assert "Valid aliases: renamed" in old["json"]["error"]["message"]
    assert list(supervisor.facts.models) == ["renamed"]


async def test_new_requests_are_held_while_the_sidecar_engine_is_away(
    gateway_server: Any, kubelet: Kubelet
) -> None:
    """A request that arrives while the sidecar engine is known down is held (not 503 at
    once) and answered when the kubelet's new engine is ready."""
    await kubelet.start()
    config = gateway_config(
        kubelet.url,
        engine={**TIMINGS, "url": kubelet.url, "health_failures": 1},
        models={"tiny": {"tokenizer": str(MODEL_DIR), "token_source": "local"}},
    )
    server = await gateway_server(config, timeout=60)
    base = base_url(server)
    supervisor: EngineSupervisor = server.app[SUPERVISOR]
    os.killpg(kubelet.runs[-1].pid, signal.SIGKILL)
    await kubelet.runs[-1].wait()
    assert await until(lambda: supervisor.state is EngineState.RESTARTING, 30)
    async with aiohttp.ClientSession() as session:
        held = asyncio.ensure_future(send(session, base + CHAT_PATH, chat("meanwhile"), 60))
        await asyncio.sleep(0.5)
        assert not held.done()
        await kubelet.start()
        result = await asyncio.wait_for(held, 60)
    assert result["status"] == 200
    assert supervisor.epoch == 2
