"""The engine's process: output into the log, exit statuses, group-wide stop, and no engine left
behind when the gateway is killed outright. Real child processes throughout."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from engine.process import REAPER, EngineProcess
from tests.helpers import (
    control_emulator,
    emulator_argv,
    emulator_info,
    free_port,
    kill_leftovers,
    pid_alive,
    port_open,
    until,
)


def controlled_argv(port: int, *flags: str) -> list[str]:
    """The emulator as an engine process the test controls (`--control`)."""
    return emulator_argv(port, "--control", *flags)


async def test_output_lines_are_logged_as_engine_output() -> None:
    """Each stdout and stderr line of the engine is one `engine_output` log entry, tagged with
    its stream; the engine sees the extra environment."""
    code = (
        "import os, sys\nprint('hello', os.environ['GUARD_TEST_VALUE'], flush=True)\n"
        "print('trouble ahead', file=sys.stderr, flush=True)\n"
    )
    with capture_logs() as logs:
        proc = await EngineProcess.spawn(
            [sys.executable, "-c", code], env={"GUARD_TEST_VALUE": "42"}, grace_s=1.0
        )
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        await proc.stop(1.0)
    lines = {(e["stream"], e["line"]) for e in logs if e["event"] == "engine_output"}
    assert ("stdout", "hello 42") in lines
    assert ("stderr", "trouble ahead") in lines


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("raise SystemExit(0)", 0),
        ("raise SystemExit(3)", 3),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", -signal.SIGKILL),
    ],
)
async def test_exit_status_passes_through_the_reaper(code: str, status: int) -> None:
    """The engine's own exit status (or the signal that killed it) is what `wait()` returns."""
    proc = await EngineProcess.spawn([sys.executable, "-c", code], grace_s=1.0)
    try:
        assert await asyncio.wait_for(proc.wait(), 10) == status
    finally:
        await proc.stop(1.0)


async def test_stop_takes_down_grandchildren(session: aiohttp.ClientSession) -> None:
    """Stopping the engine stops the children it started, too (the whole process group)."""
    port = free_port()
    proc = await EngineProcess.spawn(controlled_argv(port, "--child"), grace_s=2.0)
    info: dict[str, Any] = {}
    try:
        info = await emulator_info(session, port)
        assert pid_alive(info["child_pid"])
        await proc.stop(2.0)
        assert not pid_alive(info["pid"])
        assert not pid_alive(info["child_pid"])
        assert not pid_alive(proc.pid)
    finally:
        await proc.stop(0.5)
        kill_leftovers(info.get("pid"), info.get("child_pid"))


async def test_stop_escalates_to_sigkill(session: aiohttp.ClientSession) -> None:
    """An engine (and child) that ignore SIGTERM are killed once the grace has passed."""
    port = free_port()
    argv = controlled_argv(port, "--ignore-term", "--child", "--child-ignores-term")
    proc = await EngineProcess.spawn(argv, grace_s=0.5)
    info: dict[str, Any] = {}
    try:
        info = await emulator_info(session, port)
        with capture_logs() as logs:
            assert await proc.stop(0.5) is not None
        assert any(e["event"] == "engine_kill" for e in logs)
        assert not pid_alive(info["pid"])
        assert not pid_alive(info["child_pid"])
    finally:
        await proc.stop(0.5)
        kill_leftovers(info.get("pid"), info.get("child_pid"))


async def test_stop_cleans_up_after_an_engine_that_exited(session: aiohttp.ClientSession) -> None:
    """A child left running by an engine that exited by itself is stopped with the group."""
    port = free_port()
    proc = await EngineProcess.spawn(controlled_argv(port, "--child"), grace_s=1.0)
    info: dict[str, Any] = {}
    try:
        info = await emulator_info(session, port)
        await control_emulator(session, port, exit=5)
        assert await asyncio.wait_for(proc.wait(), 10) == 5
        assert pid_alive(info["child_pid"])
        await proc.stop(1.0)
        assert not pid_alive(info["child_pid"])
    finally:
        await proc.stop(0.5)
        kill_leftovers(info.get("pid"), info.get("child_pid"))


PARENT = """
import asyncio, sys
from engine.process import EngineProcess

async def main():
    await EngineProcess.spawn(sys.argv[1:], grace_s=0.5)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_sigkill_of_the_gateway_leaves_no_engine(session: aiohttp.ClientSession) -> None:
    """When the process that started the engine is SIGKILLed, the engine and its children are
    gone (SIGKILL after the grace included) and its port is free again."""
    port = free_port()
    argv = controlled_argv(port, "--ignore-term", "--child", "--child-ignores-term")
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    info: dict[str, Any] = {}
    try:
        info = await emulator_info(session, port)
        parent.kill()
        parent.wait(timeout=5)
        assert await until(lambda: not pid_alive(info["pid"]), 10)
        assert await until(lambda: not pid_alive(info["child_pid"]), 5)
        assert await until(lambda: not port_open(port), 5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)
        parent.wait(timeout=5)
        kill_leftovers(info.get("pid"), info.get("child_pid"))


def test_reaper_starts_nothing_for_a_parent_already_gone(tmp_path: Any) -> None:
    """A reaper whose parent is not the one named (it died first) exits without starting the
    engine."""
    marker = tmp_path / "started"
    code = f"open({str(marker)!r}, 'w').close()"
    result = subprocess.run(
        [sys.executable, "-I", str(REAPER), "--parent", "1", "--", sys.executable, "-c", code],
        timeout=10,
        check=False,
    )
    assert result.returncode == 1
    assert not marker.exists()


def test_reaper_runs_its_command() -> None:
    """Run by hand, the reaper runs its command and exits with its status."""
    result = subprocess.run(
        [sys.executable, "-I", str(REAPER), "--", sys.executable, "-c", "raise SystemExit(7)"],
        timeout=10,
        check=False,
    )
    assert result.returncode == 7
