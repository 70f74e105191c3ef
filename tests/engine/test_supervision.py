"""The gateway supervising its own real vLLM: one cold start, one kill mid-stream, one restart."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import aiohttp
import pytest

from engine.detect import START_TIME, parse_marks, restart_evidence
from engine.process import group_alive
from engine.state import EngineState
from engine.supervisor import EngineSupervisor
from gateway.keys import SUPERVISOR
from tests.helpers import (
    Recorder,
    base_url,
    error_envelope,
    free_port,
    gateway_config,
    sse_events,
    wait_status,
)
from tests.real_engine import MODEL_NAME, engine_argv, engine_env

pytestmark = pytest.mark.engine

START_S = 400.0
"""Bound on a cold start of vLLM on this (shared, 2-core) machine."""
LONG_STREAM = {
    "model": MODEL_NAME,
    "prompt": "Once upon a time",
    "n": 16,
    "max_tokens": 400,
    "ignore_eos": True,
    "temperature": 1.0,
    "stream": True,
}


async def test_engine_killed_mid_stream_is_restarted(gateway_server: Any) -> None:
    """Killing the real vLLM's process group mid-stream ends the client's stream with a
    readable error event (not a hang); the gateway restarts the engine, /ready returns to 200
    and the next request succeeds."""
    port = free_port()
    env = {k: v for k, v in engine_env().items() if os.environ.get(k) != v}
    config = gateway_config(
        f"http://127.0.0.1:{port}",
        engine={
            "command": engine_argv(port),
            "env": env,
            "startup_timeout_s": START_S,
            "startup_probe_interval_s": 1.0,
            "probe_interval_s": 1.0,
            "health_failures": 3,
            "stop_grace_s": 15,
            "restart_backoff_s": 1.0,
            "wedge_timeout_s": 120,
            "max_restarts": 2,
        },
        defaults={"max_n": 16},
    )
    server = await gateway_server(config, timeout=START_S + 20)
    base = base_url(server)
    supervisor: EngineSupervisor = server.app[SUPERVISOR]
    recorder = Recorder(supervisor)
    group = supervisor.pid
    assert group is not None

    events: list[Any] = []
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/completions", json=LONG_STREAM) as resp:
            assert resp.status == 200
            stream = sse_events(resp)
            async with asyncio.timeout(120):
                while len(events) < 3:  # the stream is under way
                    events.append(await anext(stream))
            before = await _marks(session, config.engine.url)
            os.killpg(group, signal.SIGKILL)
            async with asyncio.timeout(60):  # it ends; it does not hang
                events.extend([event async for event in stream])
        errors = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
        assert len(errors) == 1
        assert error_envelope({"error": errors[0]})["code"] == 503
        assert events[-1] == "[DONE]"

        assert await wait_status(session, base + "/ready", 200, START_S)
        after = await _marks(session, config.engine.url)
        async with session.post(
            base + "/v1/completions",
            json={"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 8, "ignore_eos": True},
        ) as resp:
            assert resp.status == 200
            answer = await resp.json()
    assert answer["usage"]["completion_tokens"] == 8
    # The sidecar shape's restart evidence holds for the real vLLM: its process start time
    # changed, and (for vLLM with several API servers, which has none) a counter went back.
    assert START_TIME in before
    assert "changed" in (restart_evidence(before, after, refused=False) or "")
    before.pop(START_TIME)
    after.pop(START_TIME, None)
    assert "went backwards" in (restart_evidence(before, after, refused=False) or "")
    assert "SIGKILL" in recorder.reasons(EngineState.FAILED)[0]
    assert supervisor.epoch == 2
    assert not group_alive(group)


async def _marks(session: aiohttp.ClientSession, engine_url: str) -> dict[str, float]:
    async with session.get(engine_url + "/metrics") as resp:
        assert resp.status == 200
        return parse_marks(await resp.text())
