"""Time from a quarantine on gateway A to a refusal on gateway B, through a real redis-server.

    .venv/bin/python bench/fleet_propagation.py [--trials 50]

Starts redis-server on a free port (temporary folder, no persistence), one emulated engine
and two gateways in front of it (sidecar shape, one process), sharing a quarantine. Each trial
quarantines a new culprit on A as probation would (a proven entry), then a client sends that
request to B again and again until B answers 422. Reported: the time until B's mirror held
the entry, and until the client had B's 422 (both from the moment of the quarantine on A).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import structlog
from aiohttp.test_utils import TestServer

from engine.emulator.app import create_emulator_app
from engine.emulator.settings import EmulatorSettings
from gateway.app import create_app
from gateway.config import parse_config
from gateway.isolation import fingerprint
from gateway.keys import CONFIG, GATE, SUPERVISOR


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", folder, "--logfile", f"{folder}/redis.log"]
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", port), timeout=1) as s,
                ):
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)


def gateway_config(engine_url: str, redis_url: str, replica: str) -> Any:
    return parse_config(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "admin": {"enabled": False},
            "engine": {"url": engine_url, "probe_interval_s": 1, "startup_probe_interval_s": 0.1},
            "models": {"tiny": {"token_source": "engine"}},
            "logging": {"format": "json"},
            "isolation": {
                "shared": {"url": redis_url, "key_prefix": "bench", "replica_id": replica}
            },
        }
    )


async def run(trials: int) -> None:
    with redis_server() as redis_url:
        engine = TestServer(
            create_emulator_app(EmulatorSettings()), host="127.0.0.1", port=free_port()
        )
        await engine.start_server()
        engine_url = str(engine.make_url("")).rstrip("/")
        gateways = []
        for replica in ("a", "b"):
            app = create_app(gateway_config(engine_url, redis_url, replica))
            server = TestServer(app, host="127.0.0.1", port=free_port())
            await server.start_server()
            assert await app[SUPERVISOR].wait_ready(30)
            gateways.append(server)
        a, b = gateways
        url_b = str(b.make_url("/v1/chat/completions"))
        skip = a.app[CONFIG].current.isolation.fingerprint_ignore_set
        mirror_ms: list[float] = []
        refusal_ms: list[float] = []
        async with aiohttp.ClientSession() as session:
            for i in range(trials):
                body = {
                    "model": "tiny",
                    "max_tokens": 1,
                    "messages": [{"role": "user", "content": f"culprit number {i}"}],
                }
                fp = fingerprint(body, skip)
                gate_b = b.app[GATE]
                t0 = time.perf_counter()
                a.app[GATE].quarantine.add(fp, "tiny", "bench", 1, time.time(), proven=True)
                known = asyncio.ensure_future(_known(gate_b, fp, t0))
                while True:
                    async with session.post(url_b, json=body) as resp:
                        await resp.read()
                        if resp.status == 422:
                            refusal_ms.append((time.perf_counter() - t0) * 1000)
                            break
                mirror_ms.append(await known)
        for server in reversed(gateways):
            await server.close()
        await engine.close()
    print(f"trials: {trials} (one culprit each); redis-server on loopback, 2 cores shared")
    _report("quarantine on A -> in B's mirror", mirror_ms)
    _report("quarantine on A -> 422 from B  ", refusal_ms)


async def _known(gate: Any, fp: str, t0: float) -> float:
    while gate.quarantine.get(fp, time.time()) is None:  # noqa: ASYNC110 (polls another's state)
        await asyncio.sleep(0)
    return (time.perf_counter() - t0) * 1000


def _report(name: str, values: list[float]) -> None:
    values = sorted(values)
    p90 = values[min(len(values) - 1, int(len(values) * 0.9))]
    print(
        f"{name}: median {statistics.median(values):.1f} ms, p90 {p90:.1f} ms, "
        f"max {values[-1]:.1f} ms"
    )


def main() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=50)
    args = parser.parse_args()
    asyncio.run(run(args.trials))


if __name__ == "__main__":
    main()
