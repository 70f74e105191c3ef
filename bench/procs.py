"""Processes for the benchmarks and the load test: start one on a free port (pinned to a core
when asked), wait until it answers, read its CPU time and memory from /proc, stop it by PID.

Every child runs in its own session (process group), so stopping it stops what it started (the
gateway's engine, nginx's workers) and nothing else: never a kill by name, other people on the
machine run the same programs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "tiny"
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (dead ones included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def pinned(core: int | None, argv: Sequence[str]) -> list[str]:
    """`argv` run on one core (taskset execs it, so the PID is the program's own)."""
    return list(argv) if core is None else ["taskset", "-c", str(core), *argv]


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM to its process group, SIGKILL after `grace` seconds."""
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 (loopback)
            return bool(resp.status == 200)
    except OSError:
        return False


def spawn(
    name: str,
    argv: Sequence[str],
    url: str,
    ready_path: str,
    workdir: Path,
    *,
    env: dict[str, str] | None = None,
    timeout: float = START_TIMEOUT_S,
) -> Child:
    """Start `argv` (output to workdir/NAME.log) and wait until `url + ready_path` answers 200."""
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
    child = Child(name, proc, url, log)
    try:
        _wait_ready(child, ready_path, timeout)
    except BaseException:  # Ctrl-C while waiting included: never leave it running
        child.stop()
        raise
    return child


def _wait_ready(child: Child, ready_path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n{child.tail()}")
        if _answers(child.url + ready_path):
            return
        time.sleep(0.2)
    raise RuntimeError(
        f"{child.name} not ready within {timeout:g} s; see {child.log}:\n{child.tail()}"
    )


@contextlib.contextmanager
def running(*children: Child) -> Iterator[None]:
    """Stop the children (last first) however the block ends."""
    try:
        yield
    finally:
        for child in reversed(children):
            child.stop()


def gateway_config(
    port: int,
    engine: dict[str, object],
    *,
    admin_port: int | None = None,
    model: dict[str, object] | None = None,
    max_body_bytes: int = 64 << 20,
) -> dict[str, object]:
    """A gateway configuration for a benchmark or load run: the tiny model's tokenizer read
    locally, the shipped defaults for everything else, JSON logs (to the child's log file)."""
    tiny: dict[str, object] = {"tokenizer": str(MODEL_DIR), "token_source": "local"}
    tiny.update(model or {})
    return {
        "server": {"host": "127.0.0.1", "port": port, "max_body_bytes": max_body_bytes},
        "admin": (
            {"enabled": True, "host": "127.0.0.1", "port": admin_port}
            if admin_port
            else {"enabled": False}
        ),
        "engine": engine,
        "logging": {"format": "json", "level": "info"},
        "models": {"tiny": tiny},
    }


def start_gateway(
    name: str,
    config: dict[str, object],
    workdir: Path,
    *,
    core: int | None = None,
    timeout: float = START_TIMEOUT_S,
) -> Child:
    """The gateway (`python -m gateway run`) with `config` written to workdir/NAME.yaml."""
    path = workdir / f"{name}.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    server = config["server"]
    assert isinstance(server, dict)
    return spawn(
        name,
        pinned(core, [sys.executable, "-m", "gateway", "run", "--config", str(path)]),
        f"http://127.0.0.1:{server['port']}",
        "/ready",
        workdir,
        timeout=timeout,
    )


def machine() -> str:
    """One line about this machine: CPU model, cores, memory, load."""
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // (1024 * 1024)
    load = os.getloadavg()
    return (
        f"{model}, {os.cpu_count()} cores, {mem} GiB, Python {sys.version.split()[0]}, "
        f"load average {load[0]:.1f} at start"
    )
