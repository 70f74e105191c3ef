"""Engine supervision end to end: the gateway in front of the emulator, run as a real process
that fails on demand, in both deployment shapes; and the gateway process itself stopped by
SIGTERM or killed by SIGKILL.

Faults are triggered by requests sent straight to the emulator, so that failure isolation
(gateway/admission.py) plays no part, except for the wedge: it is detected from the requests
the gateway has in flight, so one is sent through the gateway too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from engine.process import EngineProcess, group_alive
from engine.state import EngineState
from engine.supervisor import EngineSupervisor
from gateway.keys import SUPERVISOR
from tests.helpers import (
    ROOT,
    Recorder,
    base_url,
    chat,
    content_of,
    emulator_argv,
    emulator_section,
    error_envelope,
    free_port,
    gateway_config,
    port_open,
    send,
    sse_events,
    status_of,
    until,
    wait_status,
)
from tests.real_engine import stop_process_group

DIE = "DIE-5d1e"
HANG = "HANG-0b7c"
FAULT_FLAGS: dict[str, tuple[str, ...]] = {
    "exit": ("--die-on", DIE),
    "health": ("--multi-step-bug", "--on-death", "stay"),
    "wedge": ("--hang-on", HANG),
}
WEDGE_TIMEOUT_S = 1.5
STOP_GRACE_S = 3.0
TIMINGS: dict[str, Any] = {
    "probe_interval_s": 0.2,
    "startup_probe_interval_s": 0.1,
    "probe_timeout_s": 3,
    "health_failures": 2,
    "wedge_timeout_s": WEDGE_TIMEOUT_S,
    "wedge_check_interval_s": 0.2,
    "startup_timeout_s": 30,
    "stop_grace_s": STOP_GRACE_S,
    # A whole second before each restart: long enough for a poll to see /ready 503.
    "restart_backoff_s": 1.0,
    "restart_backoff_max_s": 1.0,
    "max_restarts": 5,
    "expected_restart_s": 5,
}


def engine_section(
    port: int, *flags: str, supervised: bool = True, **overrides: Any
) -> dict[str, Any]:
    return emulator_section(port, *flags, timings=TIMINGS, supervised=supervised, **overrides)


async def trigger(session: aiohttp.ClientSession, engine_url: str, fault: str) -> None:
    """Make the engine fail with a request sent straight to it, not through the gateway."""
    # Straight from the engine, an answer may be a bare 500: its body is read as any type.
    if fault == "exit":  # os._exit(0) while the request is in flight
        with pytest.raises(aiohttp.ClientError):
            await send(
                session,
                engine_url + "/v1/completions",
                {"model": "tiny", "prompt": f"please {DIE}", "max_tokens": 4},
                content_type=None,
            )
    elif fault == "health":  # no max_tokens: the multi-step bug kills the engine loop
        result = await send(
            session,
            engine_url + "/v1/chat/completions",
            chat("no limit", max_tokens=None),
            content_type=None,
        )
        assert result["status"] == 500
    else:  # every generation stalls for good; the stream's headers are already sent
        async with session.post(
            engine_url + "/v1/completions",
            json={"model": "tiny", "prompt": f"stop {HANG}", "max_tokens": 4, "stream": True},
        ) as resp:
            assert resp.status == 200
        assert await status_of(session, engine_url + "/health") == 200


# The supervised shape: the gateway starts the emulator and restarts it.


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("exit", "engine exited with status 0 while ready"),
        ("health", "/health failed 2 probes in a row (last: HTTP 503)"),
        ("wedge", "wedged: no bytes to in-flight requests"),
    ],
)
async def test_supervised_failure_is_detected_and_restarted(
    gateway_server: Any, fault: str, reason: str
) -> None:
    """Supervised shape: an engine that exits with status 0, fails its /health probes, or
    wedges while /health says 200 is failed for that reason, /ready turns 503, the engine is
    restarted in a new process group, /ready returns to 200 and the next request succeeds."""
    port = free_port()
    engine_url = f"http://127.0.0.1:{port}"
    server = await gateway_server(
        gateway_config(engine_url, engine=engine_section(port, *FAULT_FLAGS[fault])), timeout=60
    )
    base = base_url(server)
    supervisor: EngineSupervisor = server.app[SUPERVISOR]
    recorder = Recorder(supervisor)
    first_group = supervisor.pid
    assert first_group is not None
    async with aiohttp.ClientSession() as session:
        assert await status_of(session, base + "/ready") == 200
        await trigger(session, engine_url, fault)
        stalled = None
        if fault == "wedge":  # the gateway sees a wedge through the requests it relays
            stalled = asyncio.ensure_future(
                send(session, base + "/v1/chat/completions", chat("waiting", stream=True))
            )
        assert await wait_status(session, base + "/ready", 503, 30)
        assert await wait_status(session, base + "/ready", 200, 30)
        after = await send(session, base + "/v1/chat/completions", chat("after the restart"))
        if stalled is not None:
            # Cut before its first byte, it was retried on the new engine.
            retried = await asyncio.wait_for(stalled, 30)
            assert retried["status"] == 200
            assert retried["events"][-1] == "[DONE]"
    assert recorder.reasons(EngineState.FAILED)[0].startswith(reason)
    assert [c.new for c in recorder.changes] == [
        EngineState.FAILED,
        EngineState.RESTARTING,
        EngineState.STARTING,
        EngineState.READY,
    ]
    assert supervisor.epoch == 2
    assert supervisor.pid not in {None, first_group}
    assert not group_alive(first_group)
    assert after["status"] == 200
    assert after["json"]["usage"]["completion_tokens"] == 8


async def test_supervised_give_up_turns_health_503(gateway_server: Any) -> None:
    """Supervised shape: an engine that exits at once is restarted `max_restarts` (2) times,
    then given up; the gateway's /health turns from 200 to 503 and a generation is answered
    503 at once instead of waiting in the queue."""
    port = free_port()
    config = gateway_config(
        f"http://127.0.0.1:{port}",
        engine={
            **engine_section(port),
            "max_restarts": 2,
            "command": [sys.executable, "-c", "raise SystemExit(0)"],
        },
        isolation={"queue_timeout_s": 120},
    )
    server = await gateway_server(config, wait_ready=False)
    base = base_url(server)
    supervisor: EngineSupervisor = server.app[SUPERVISOR]
    async with aiohttp.ClientSession() as session:
        assert await status_of(session, base + "/health") == 200  # 2 s of backoff to go
        assert await wait_status(session, base + "/health", 503, 30)
        assert supervisor.state is EngineState.GIVEN_UP
        assert await status_of(session, base + "/ready") == 503
        result = await send(session, base + "/v1/chat/completions", chat("anyone?"), timeout=20)
    assert result["status"] == 503
    assert error_envelope(result["json"])["type"] == "ServiceUnavailableError"
    assert int(result["headers"]["Retry-After"]) >= 1


# The sidecar shape: the engine is someone else's to restart; the test plays the kubelet.


class Kubelet:
    """Runs the engine container of the sidecar shape: the emulator on a fixed port, as a
    process group of its own, replaced when the test says so."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.runs: list[EngineProcess] = []

    async def start(self, *flags: str) -> None:
        self.runs.append(
            await EngineProcess.spawn(emulator_argv(self.port, *flags), grace_s=STOP_GRACE_S)
        )

    async def replace(self, *flags: str) -> None:
        await self.runs[-1].stop(STOP_GRACE_S)
        await self.start(*flags)

    async def stop(self) -> None:
        for run in self.runs:
            await run.stop(STOP_GRACE_S)


@pytest.fixture
async def kubelet() -> AsyncIterator[Kubelet]:
    k = Kubelet()
    yield k
    await k.stop()


@pytest.mark.parametrize("fault", ["exit", "health", "wedge"])
async def test_sidecar_failure_turns_engine_live_503_until_replaced(
    gateway_server: Any, kubelet: Kubelet, fault: str
) -> None:
    """Sidecar shape: an engine that exits, fails its /health probes, or wedges turns
    /engine/live and /ready 503 while the gateway's own /health stays 200; once the engine is
    replaced on the same port both are 200 again and the next request succeeds."""
    await kubelet.start(*FAULT_FLAGS[fault])
    server = await gateway_server(
        gateway_config(kubelet.url, engine=engine_section(kubelet.port, supervised=False)),
        timeout=60,
    )
    base = base_url(server)
    supervisor: EngineSupervisor = server.app[SUPERVISOR]
    async with aiohttp.ClientSession() as session:
        for path in ("/health", "/ready", "/engine/live"):
            assert await status_of(session, base + path) == 200
        await trigger(session, kubelet.url, fault)
        stalled = None
        if fault == "wedge":
            stalled = asyncio.ensure_future(
                send(session, base + "/v1/chat/completions", chat("waiting", stream=True))
            )
        assert await wait_status(session, base + "/engine/live", 503, 30)
        assert await status_of(session, base + "/ready") == 503
        assert await status_of(session, base + "/health") == 200
        assert supervisor.state is EngineState.RESTARTING
        if fault == "wedge":  # the engine itself still claims to be healthy
            assert await status_of(session, kubelet.url + "/health") == 200
        await kubelet.replace()
        if stalled is not None:  # cut when its engine went: an answer, not a hang
            result = await asyncio.wait_for(stalled, 30)
            assert result["status"] in {200, 503}
            if result["status"] == 503:
                error_envelope(result["json"])
        assert await wait_status(session, base + "/engine/live", 200, 30)
        assert await status_of(session, base + "/ready") == 200
        after = await send(session, base + "/v1/chat/completions", chat("after the restart"))
    assert after["status"] == 200
    assert supervisor.epoch == 2


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])
async def test_sidecar_busy_engine_stays_live(
    gateway_server: Any, kubelet: Kubelet, stream: bool
) -> None:
    """Sidecar shape: an engine at capacity (one slot, so a probe generation would wait) with
    a generation that lasts several wedge timeouts (streamed, bytes flow; not streamed, no
    byte until the end but the token counters move) keeps /engine/live at 200 throughout
    and completes."""
    await kubelet.start("--tokens-per-second", "5", "--max-num-seqs", "1")
    server = await gateway_server(
        gateway_config(kubelet.url, engine=engine_section(kubelet.port, supervised=False)),
        timeout=60,
    )
    base = base_url(server)
    supervisor: EngineSupervisor = server.app[SUPERVISOR]
    lives: list[int | None] = []
    async with aiohttp.ClientSession() as session:
        began = time.monotonic()
        busy = asyncio.ensure_future(
            send(
                session,
                base + "/v1/chat/completions",
                chat("take your time", max_tokens=25, stream=stream),
            )
        )
        for _ in range(400):  # bounded: 25 tokens at 5 a second take about 5 s
            if busy.done():
                break
            lives.append(await status_of(session, base + "/engine/live"))
            await asyncio.sleep(0.2)
        result = await asyncio.wait_for(busy, 60)
        lasted = time.monotonic() - began
    assert lasted > 2 * WEDGE_TIMEOUT_S  # the emulator's pace guarantees it
    assert len(lives) >= 5
    assert set(lives) == {200}
    assert result["status"] == 200
    if stream:
        assert result["events"][-1] == "[DONE]"
        assert len(content_of(result["events"]).split()) == 25
    else:
        assert result["json"]["usage"]["completion_tokens"] == 25
    assert supervisor.state is EngineState.READY
    assert supervisor.epoch == 1


# The gateway process: `python -m gateway run --config FILE`.


class GatewayProcess:
    """The gateway as a real process, its structlog JSON lines in a file."""

    def __init__(self, tmp_path: Path, *flags: str, **server: Any) -> None:
        self.port = free_port()
        self.engine_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "server": {"host": "127.0.0.1", "port": self.port, **server},
            "admin": {"enabled": False},
            "engine": engine_section(self.engine_port, *flags),
            "logging": {"format": "json"},
        }
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        self.log_path = tmp_path / "gateway.log"
        with self.log_path.open("wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run", "--config", str(path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and event.get("event") == name:
                    out.append(event)
        return out

    def engine_group(self) -> int:
        """The process group of the engine it started (led by the reaper)."""
        spawned = self.events("engine_spawned")
        assert len(spawned) == 1, self.log_path.read_text(errors="replace")[-4000:]
        pid: int = spawned[0]["pid"]
        return pid

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 60.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while await status_of(session, self.url + "/ready") != 200:
            assert self.proc.poll() is None, self.log_path.read_text(errors="replace")[-4000:]
            assert loop.time() < deadline, "the gateway was not ready in time"
            await asyncio.sleep(0.1)

    async def wait_exit(self, timeout: float) -> int | None:
        """Its exit status, or None if it is still running after `timeout`."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(self.proc.wait, timeout)
        return self.proc.returncode


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[list[GatewayProcess]]:
    """Gateways started as processes by the test; whatever is left of them and of their
    engines is stopped by process group afterwards."""
    started: list[GatewayProcess] = []
    yield started
    for gateway in started:
        if gateway.proc.poll() is None:
            stop_process_group(gateway.proc.pid, grace=10)
            with contextlib.suppress(subprocess.TimeoutExpired):
                gateway.proc.wait(timeout=5)
        for event in gateway.events("engine_spawned"):
            if group_alive(event["pid"]):
                stop_process_group(event["pid"], grace=5)


async def test_sigterm_drains_then_stops_the_engine(
    gateway_process: list[GatewayProcess], tmp_path: Path
) -> None:
    """On SIGTERM the gateway answers /ready 503 at once and refuses new generations with 503
    while it keeps listening, lets the in-flight stream finish, then stops the engine's whole
    process group (its port freed) and exits 0."""
    gateway = GatewayProcess(tmp_path, "--tokens-per-second", "10", shutdown_grace_s=30)
    gateway_process.append(gateway)
    async with aiohttp.ClientSession() as session:
        await gateway.wait_ready(session)
        engine_group = gateway.engine_group()
        assert group_alive(engine_group)
        assert port_open(gateway.engine_port)
        # 50 tokens at 10 a second: about 5 s in flight.
        async with session.post(
            gateway.url + "/v1/chat/completions",
            json=chat("a long one", max_tokens=50, stream=True),
        ) as resp:
            assert resp.status == 200
            events = sse_events(resp)
            first = await anext(events)
            gateway.proc.send_signal(signal.SIGTERM)
            assert await wait_status(session, gateway.url + "/ready", 503, 10)
            refused = await send(
                session, gateway.url + "/v1/chat/completions", chat("too late"), timeout=10
            )
            async with asyncio.timeout(60):
                rest = [event async for event in events]
        assert await gateway.wait_exit(30) == 0
    assert refused["status"] == 503
    assert "shutting down" in error_envelope(refused["json"])["message"]
    assert rest[-1] == "[DONE]"
    assert not [e for e in rest if isinstance(e, dict) and "error" in e]
    assert len(content_of([first, *rest]).split()) == 50
    assert not gateway.events("gateway_drain_deadline")
    assert gateway.events("gateway_stopped")
    assert not group_alive(engine_group)
    assert not port_open(gateway.engine_port)
    assert not port_open(gateway.port)


async def test_sigterm_cuts_requests_past_the_grace(
    gateway_process: list[GatewayProcess], tmp_path: Path
) -> None:
    """A request still in flight when `shutdown_grace_s` runs out is cut (its stream ends
    rather than hangs); the gateway still stops its engine and exits 0."""
    gateway = GatewayProcess(tmp_path, "--tokens-per-second", "2", shutdown_grace_s=1)
    gateway_process.append(gateway)
    async with aiohttp.ClientSession() as session:
        await gateway.wait_ready(session)
        engine_group = gateway.engine_group()
        async with session.post(
            gateway.url + "/v1/chat/completions",
            json=chat("an endless one", max_tokens=400, stream=True),
        ) as resp:
            events = sse_events(resp)
            await anext(events)
            gateway.proc.send_signal(signal.SIGTERM)
            rest: list[Any] = []
            async with asyncio.timeout(60):
                with contextlib.suppress(aiohttp.ClientError):
                    async for event in events:
                        rest.append(event)  # noqa: PERF401 (keeps what came before a cut)
        assert await gateway.wait_exit(30) == 0
    assert "[DONE]" not in rest
    assert len(content_of(rest).split()) < 400
    assert [e["in_flight"] for e in gateway.events("gateway_drain_deadline")] == [1]
    assert not group_alive(engine_group)
    assert not port_open(gateway.engine_port)


async def test_sigkill_of_the_gateway_takes_the_engine_down(
    gateway_process: list[GatewayProcess], tmp_path: Path
) -> None:
    """A gateway killed outright leaves no engine behind: its whole process group goes and
    its port is released."""
    gateway = GatewayProcess(tmp_path)
    gateway_process.append(gateway)
    async with aiohttp.ClientSession() as session:
        await gateway.wait_ready(session)
    engine_group = gateway.engine_group()
    assert group_alive(engine_group)
    assert port_open(gateway.engine_port)
    os.kill(gateway.proc.pid, signal.SIGKILL)
    assert await gateway.wait_exit(10) == -signal.SIGKILL
    assert await until(lambda: not group_alive(engine_group), 20, interval=0.1)
    assert await until(lambda: not port_open(gateway.engine_port), 20, interval=0.1)
