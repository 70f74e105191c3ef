"""The engine supervisor in both deployment shapes against the emulator run as a real subprocess,
changed at run time through its control endpoint, with short timings. Its decisions are
tables in tests/unit/test_detect.py."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from engine.detect import PROBE_PROMPT
from engine.process import EngineProcess
from engine.settings import EngineConfig
from engine.state import EngineState
from engine.supervisor import EngineSupervisor
from tests.helpers import (
    Recorder,
    control_emulator,
    emulator_argv,
    emulator_info,
    free_port,
    kill_leftovers,
    pid_alive,
    until,
)

MODEL = "tiny"
LORA = "tiny-lora"
MAX_MODEL_LEN = 512


def controlled_argv(port: int, *flags: str) -> list[str]:
    """The emulator serving "tiny" and a LoRA adapter, controlled by the test (`--control`)."""
    return emulator_argv(port, "--control", "--lora-modules", f"{LORA}=/adapters/x", *flags)


def engine_config(port: int, **overrides: Any) -> EngineConfig:
    values: dict[str, Any] = {
        "url": f"http://127.0.0.1:{port}",
        "probe_interval_s": 0.1,
        "startup_probe_interval_s": 0.1,
        "probe_timeout_s": 1.0,
        "health_failures": 2,
        "wedge_timeout_s": 0.5,
        "wedge_check_interval_s": 0.1,
        "startup_timeout_s": 10.0,
        "stop_grace_s": 1.0,
        "restart_backoff_s": 0.05,
        "restart_backoff_max_s": 0.2,
        "max_restarts": 3,
        "restart_window_s": 60.0,
        "expected_restart_s": 60.0,
    }
    return EngineConfig(**{**values, **overrides})


class FakeProgress:
    """The gateway's in-flight view, set by the test: stalled since `since`, or nothing in
    flight."""

    def __init__(self) -> None:
        self.since: float | None = None

    def stall(self) -> None:
        self.since = time.monotonic() - 100.0

    def stalled_for(self, now: float) -> float | None:
        return None if self.since is None else now - self.since


Factory = Callable[..., EngineSupervisor]


@pytest.fixture
async def make_supervisor(session: aiohttp.ClientSession) -> AsyncIterator[Factory]:
    """Supervisors built here are stopped (with their engines) after the test."""
    made: list[EngineSupervisor] = []

    def make(config: EngineConfig, **kwargs: Any) -> EngineSupervisor:
        supervisor = EngineSupervisor(config, session, **kwargs)
        made.append(supervisor)
        return supervisor

    yield make
    for supervisor in made:
        await supervisor.stop()


@pytest.fixture
async def sidecar_engines() -> AsyncIterator[list[EngineProcess]]:
    """Engines the test starts itself (playing the kubelet); stopped after the test."""
    engines: list[EngineProcess] = []
    yield engines
    for engine in engines:
        await engine.stop(1.0)


async def engine_pid(session: aiohttp.ClientSession, port: int) -> int:
    pid: int = (await emulator_info(session, port))["pid"]
    return pid


async def test_ready_means_a_generation_answered(make_supervisor: Factory) -> None:
    """A started engine becomes ready once it answered a one-token generation, with its models
    learnt (a LoRA adapter included) and the change logged."""
    port = free_port()
    supervisor = make_supervisor(engine_config(port, command=tuple(controlled_argv(port))))
    with capture_logs() as logs:
        await supervisor.start()
        assert supervisor.state is EngineState.STARTING
        assert supervisor.retry_after_s() > 30.0  # nothing measured yet: expected_restart_s
        assert await supervisor.wait_ready(15.0)
    assert supervisor.epoch == 1
    assert dict(supervisor.models) == {MODEL: MAX_MODEL_LEN, LORA: MAX_MODEL_LEN}
    assert supervisor.live()
    assert {"event": "engine_state", "from": "starting", "to": "ready"}.items() <= next(
        e for e in logs if e["event"] == "engine_state" and e["to"] == "ready"
    ).items()


async def test_never_ready_engine_is_failed_after_the_startup_timeout(
    make_supervisor: Factory,
) -> None:
    """An engine whose generations never succeed (/health alone is not enough) is failed when
    the startup timeout passes, and restarted."""
    port = free_port()
    config = engine_config(
        port, command=tuple(controlled_argv(port, "--hang-on", PROBE_PROMPT)), startup_timeout_s=1.5
    )
    supervisor = make_supervisor(config)
    recorder = Recorder(supervisor)
    await supervisor.start()
    assert await until(lambda: recorder.reasons(EngineState.RESTARTING), 10)
    assert not supervisor.is_ready()
    assert "not ready within 1.5s" in recorder.reasons(EngineState.FAILED)[0]


@pytest.mark.parametrize("status", [0, 3])
async def test_exit_is_detected_and_restarted(
    make_supervisor: Factory, session: aiohttp.ClientSession, status: int
) -> None:
    """An engine that exits, with status 0 as much as any other, is failed and started again:
    failed → restarting → starting → ready, epoch 2."""
    port = free_port()
    supervisor = make_supervisor(engine_config(port, command=tuple(controlled_argv(port))))
    recorder = Recorder(supervisor)
    await supervisor.start()
    assert await supervisor.wait_ready(15.0)
    first_pid = await engine_pid(session, port)
    with capture_logs() as logs:
        await control_emulator(session, port, exit=status)
        assert await until(lambda: supervisor.epoch == 2 and supervisor.is_ready(), 15)
    assert [c.new for c in recorder.changes][-4:] == [
        EngineState.FAILED,
        EngineState.RESTARTING,
        EngineState.STARTING,
        EngineState.READY,
    ]
    assert f"exited with status {status}" in recorder.reasons(EngineState.FAILED)[0]
    assert not pid_alive(first_pid)
    assert await engine_pid(session, port) != first_pid
    failed = next(e for e in logs if e["event"] == "engine_state" and e["to"] == "failed")
    assert failed["from"] == "ready"
    assert "exited with status" in failed["reason"]
    restarting = recorder.changes.index(
        next(c for c in recorder.changes if c.new is EngineState.RESTARTING)
    )
    assert recorder.retry_after[restarting] < 60.0  # the measured start, not the guess
    assert recorder.live[restarting] is False


async def test_health_failures_in_a_row_fail_the_engine(
    make_supervisor: Factory, session: aiohttp.ClientSession
) -> None:
    """`health_failures` failed /health probes in a row fail a ready engine; it is restarted."""
    port = free_port()
    supervisor = make_supervisor(engine_config(port, command=tuple(controlled_argv(port))))
    recorder = Recorder(supervisor)
    await supervisor.start()
    assert await supervisor.wait_ready(15.0)
    await control_emulator(session, port, health=503)
    assert await until(lambda: supervisor.epoch == 2 and supervisor.is_ready(), 15)
    assert (
        "/health failed 2 probes in a row (last: HTTP 503)"
        in recorder.reasons(EngineState.FAILED)[0]
    )


async def test_one_failure_report_does_not_fail_a_healthy_engine(make_supervisor: Factory) -> None:
    """A report of a failed request makes the supervisor probe, and a healthy engine stays
    ready."""
    port = free_port()
    supervisor = make_supervisor(
        engine_config(port, command=tuple(controlled_argv(port)), probe_interval_s=30.0)
    )
    await supervisor.start()
    assert await supervisor.wait_ready(15.0)
    with capture_logs() as logs:
        for _ in range(5):
            supervisor.report_engine_failure("connection reset")
        await asyncio.sleep(0.5)
    assert supervisor.state is EngineState.READY
    assert supervisor.epoch == 1
    assert any(e["event"] == "engine_failure_reported" for e in logs)


async def test_failure_report_triggers_the_probes(
    make_supervisor: Factory, session: aiohttp.ClientSession, sidecar_engines: list[EngineProcess]
) -> None:
    """After a report, the probes run at once rather than at the next (30 s away) interval,
    and a dead engine is failed."""
    port = free_port()
    sidecar_engines.append(await EngineProcess.spawn(controlled_argv(port), grace_s=1.0))
    supervisor = make_supervisor(engine_config(port, probe_interval_s=30.0))
    await supervisor.start()
    assert await supervisor.wait_ready(15.0)
    await sidecar_engines[0].stop(1.0)
    await asyncio.sleep(0.3)
    assert supervisor.is_ready()  # nothing probed yet
    supervisor.report_engine_failure("connection refused")
    assert await until(lambda: supervisor.state is EngineState.RESTARTING, 10)


async def test_wedged_engine_is_failed_and_restarted(
    make_supervisor: Factory, session: aiohttp.ClientSession
) -> None:
    """No bytes to in-flight requests, a frozen token counter and an unanswered probe
    generation make a wedge, though /health says 200; the engine is restarted."""
    port = free_port()
    progress = FakeProgress()
    supervisor = make_supervisor(
        engine_config(port, command=tuple(controlled_argv(port))), progress=progress
    )
    recorder = Recorder(supervisor)
    await supervisor.start()
    assert await supervisor.wait_ready(15.0)
    await control_emulator(session, port, hang=True)
    progress.stall()
    assert await until(lambda: bool(recorder.reasons(EngineState.FAILED)), 10)
    progress.since = None
    assert recorder.reasons(EngineState.FAILED)[0].startswith("wedged")
    assert await supervisor.wait_ready(15.0)
    assert supervisor.epoch == 2


async def test_busy_engine_is_not_wedged(
    make_supervisor: Factory, session: aiohttp.ClientSession
) -> None:
    """While the token counter moves, a long stall of in-flight requests is patience, not a
    wedge (even though a probe generation would not answer)."""
    port = free_port()
    progress = FakeProgress()
    supervisor = make_supervisor(
        engine_config(port, command=tuple(controlled_argv(port))), progress=progress
    )
    await supervisor.start()
    assert await supervisor.wait_ready(15.0)
    await control_emulator(session, port, hang=True, busy=True)
    progress.stall()
    with capture_logs() as logs:
        await asyncio.sleep(3.0)  # six wedge timeouts
    assert supervisor.state is EngineState.READY
    assert supervisor.epoch == 1
    assert not [e for e in logs if e["event"] == "engine_wedge_suspected"]


async def test_answered_probe_clears_a_wedge_suspicion(
    make_supervisor: Factory, session: aiohttp.ClientSession
) -> None:
    """A stall with a frozen counter is only a suspicion: a probe generation that answers
    keeps the engine ready."""
    port = free_port()
    progress = FakeProgress()
    supervisor = make_supervisor(
        engine_config(port, command=tuple(controlled_argv(port))), progress=progress
    )
    await supervisor.start()
    assert await supervisor.wait_ready(15.0)
    progress.stall()
    with capture_logs() as logs:
        assert await until(lambda: any(e["event"] == "engine_wedge_cleared" for e in logs), 10)
        await asyncio.sleep(0.5)
    assert supervisor.state is EngineState.READY
    assert supervisor.epoch == 1


async def test_wedge_without_metrics_rests_on_the_stall(
    make_supervisor: Factory,
    session: aiohttp.ClientSession,
    sidecar_engines: list[EngineProcess],
) -> None:
    """An engine without /metrics that stalls and does not answer a probe is wedged: in the
    sidecar shape it is reported not live."""
    port = free_port()
    sidecar_engines.append(await EngineProcess.spawn(controlled_argv(port), grace_s=1.0))
    progress = FakeProgress()
    supervisor = make_supervisor(engine_config(port), progress=progress)
    await supervisor.start()
    assert await supervisor.wait_ready(15.0)
    await control_emulator(session, port, hang=True, metrics=False)
    progress.stall()
    assert await until(lambda: not supervisor.live(), 10)
    assert supervisor.state is EngineState.RESTARTING


async def test_gives_up_after_max_restarts(make_supervisor: Factory) -> None:
    """An engine that keeps dying is restarted `max_restarts` times within the window, then
    given up for good."""
    command = (sys.executable, "-c", "raise SystemExit(1)")
    supervisor = make_supervisor(engine_config(free_port(), command=command, max_restarts=2))
    recorder = Recorder(supervisor)
    await supervisor.start()
    assert await until(lambda: supervisor.state is EngineState.GIVEN_UP, 12)
    assert not await supervisor.wait_ready(0.1)
    assert not supervisor.restart_expected()
    assert not supervisor.live()
    assert len(recorder.reasons(EngineState.FAILED)) == 3
    assert len(recorder.reasons(EngineState.RESTARTING)) == 2
    assert "2 restarts within 60s" in recorder.reasons(EngineState.GIVEN_UP)[0]
    await asyncio.sleep(0.3)
    assert supervisor.state is EngineState.GIVEN_UP
    assert supervisor.retry_after_s() == 60.0


async def test_sidecar_live_follows_the_engine(
    make_supervisor: Factory, sidecar_engines: list[EngineProcess]
) -> None:
    """Sidecar shape: the engine's death turns live() False (the kubelet would restart it);
    when it is back and answers, live() is True again and the epoch moves on."""
    port = free_port()
    sidecar_engines.append(await EngineProcess.spawn(controlled_argv(port), grace_s=1.0))
    supervisor = make_supervisor(engine_config(port))
    recorder = Recorder(supervisor)
    await supervisor.start()
    assert await supervisor.wait_ready(15.0)
    assert supervisor.live()
    os.killpg(sidecar_engines[0].pid, signal.SIGKILL)
    assert await until(lambda: not supervisor.live(), 10)
    assert supervisor.restart_expected()
    assert supervisor.state is EngineState.RESTARTING
    sidecar_engines.append(await EngineProcess.spawn(controlled_argv(port), grace_s=1.0))  # kubelet
    assert await supervisor.wait_ready(15.0)
    assert supervisor.live()
    assert supervisor.epoch == 2
    assert [c.new for c in recorder.changes] == [
        EngineState.STARTING,
        EngineState.READY,
        EngineState.FAILED,
        EngineState.RESTARTING,
        EngineState.READY,
    ]


async def test_explicit_restart(make_supervisor: Factory, session: aiohttp.ClientSession) -> None:
    """restart() replaces a ready engine's process with a new one."""
    port = free_port()
    supervisor = make_supervisor(engine_config(port, command=tuple(controlled_argv(port))))
    recorder = Recorder(supervisor)
    await supervisor.start()
    assert await supervisor.wait_ready(15.0)
    first_pid = await engine_pid(session, port)
    await supervisor.restart("operator asked")
    assert not supervisor.is_ready()
    assert await supervisor.wait_ready(15.0)
    assert supervisor.epoch == 2
    assert await engine_pid(session, port) != first_pid
    assert recorder.reasons(EngineState.FAILED) == ["restart requested: operator asked"]


async def test_stop_stops_the_engine_group(
    make_supervisor: Factory, session: aiohttp.ClientSession
) -> None:
    """stop() ends supervision and the engine's whole process group."""
    port = free_port()
    supervisor = make_supervisor(
        engine_config(port, command=tuple(controlled_argv(port, "--child")))
    )
    await supervisor.start()
    assert await supervisor.wait_ready(15.0)
    info = await emulator_info(session, port)
    try:
        await supervisor.stop()
        assert supervisor.state is EngineState.STOPPED
        assert not supervisor.restart_expected()
        assert not pid_alive(info["pid"])
        assert not pid_alive(info["child_pid"])
    finally:
        kill_leftovers(info["pid"], info["child_pid"])
