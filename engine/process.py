"""The engine's process: started in a process group of its own behind the reaper, its output
pumped into the gateway's log stream, stopped group-wide (SIGTERM, grace, SIGKILL).

vLLM runs child processes (engine core, workers); they share the group, so signalling the group
reaches them all. The reaper (`engine/reaper.py`) leads the group and takes it down if the
gateway itself is killed outright.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import structlog

from engine.reaper import group_members

logger = structlog.get_logger(__name__)

REAPER = Path(__file__).with_name("reaper.py")
LINE_LIMIT = 1 << 20
"""A longer engine output line is dropped (with a note) rather than buffered."""
GROUP_POLL_S = 0.05
KILL_WAIT_S = 5.0
"""Bound on waiting for the group to vanish after SIGKILL (it can only wait on the kernel)."""
PUMP_DRAIN_S = 1.0
"""Bound on reading the last output once the group is gone."""


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is still alive (zombies do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    members = group_members(pgid)
    return members is None or bool(members)


class EngineProcess:
    """One run of the engine: a process group whose leader is the reaper (or the engine itself
    when started without it)."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        pumps: list[asyncio.Task[None]],
        transports: list[asyncio.ReadTransport],
    ) -> None:
        self._proc = proc
        self._pumps = pumps
        self._transports = transports

    @classmethod
    async def spawn(
        cls,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        grace_s: float = 10.0,
        reaper: bool = True,
    ) -> EngineProcess:
        """Start `argv` with `env` merged over the gateway's environment, in a new session and
        process group; its stdout and stderr lines go to the log as `engine_output`."""
        if not argv:
            raise ValueError("the engine command is empty")
        command = list(argv)
        if reaper:
            command = [
                sys.executable,
                "-I",
                str(REAPER),
                "--parent",
                str(os.getpid()),
                "--grace",
                str(grace_s),
                "--",
                *command,
            ]
        # Our own pipes rather than asyncio's: Process.wait() on asyncio's pipes would also wait
        # for every child that inherited them, and vLLM's children can outlive the engine.
        pipes = [os.pipe(), os.pipe()]
        try:
            proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=pipes[0][1],
                stderr=pipes[1][1],
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        except BaseException:
            for read_end, _ in pipes:
                os.close(read_end)
            raise
        finally:
            for _, write_end in pipes:
                os.close(write_end)
        loop = asyncio.get_running_loop()
        pumps: list[asyncio.Task[None]] = []
        transports: list[asyncio.ReadTransport] = []
        for (read_end, _), stream in zip(pipes, ("stdout", "stderr"), strict=True):
            reader = asyncio.StreamReader(limit=LINE_LIMIT)
            transport, _ = await loop.connect_read_pipe(
                functools.partial(asyncio.StreamReaderProtocol, reader),
                os.fdopen(read_end, "rb", buffering=0),
            )
            transports.append(transport)
            pumps.append(
                asyncio.create_task(
                    _pump(reader, stream, proc.pid), name=f"engine-{stream}-{proc.pid}"
                )
            )
        logger.info("engine_spawned", pid=proc.pid, argv=list(argv), reaper=reaper)
        return cls(proc, pumps, transports)

    @property
    def pid(self) -> int:
        """The group leader's pid, which is also the process group id."""
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        """The engine's exit status once it has exited (negative: killed by that signal)."""
        return await self._proc.wait()

    async def stop(self, grace_s: float) -> int | None:
        """Stop the whole process group: SIGTERM, then SIGKILL after `grace_s`; reap it and read
        its last output. Also cleans up children an engine that already exited left behind."""
        pgid = self.pid
        if group_alive(pgid):
            _killpg(pgid, signal.SIGTERM)
            if not await _wait_group_gone(pgid, grace_s):
                logger.warning("engine_kill", pid=pgid, grace_s=grace_s)
                _killpg(pgid, signal.SIGKILL)
                if not await _wait_group_gone(pgid, KILL_WAIT_S):
                    logger.error("engine_group_lingers", pid=pgid)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._proc.wait(), KILL_WAIT_S)
        await self._close_pumps()
        logger.info("engine_stopped", pid=pgid, returncode=self.returncode)
        return self.returncode

    async def _close_pumps(self) -> None:
        _, pending = await asyncio.wait(self._pumps, timeout=PUMP_DRAIN_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for transport in self._transports:
            transport.close()


async def _pump(reader: asyncio.StreamReader, stream: str, pid: int) -> None:
    """Log each line the engine writes, tagged as engine output."""
    while True:
        try:
            raw = await reader.readline()
        except ValueError:
            logger.warning(
                "engine_output",
                line=f"[line over {LINE_LIMIT} bytes dropped]",
                stream=stream,
                pid=pid,
            )
            continue
        if not raw:
            return
        logger.info(
            "engine_output",
            line=raw.decode(errors="replace").rstrip("\r\n"),
            stream=stream,
            pid=pid,
        )


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


async def _wait_group_gone(pgid: int, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while group_alive(pgid):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(GROUP_POLL_S)
    return True
