"""How fast the engine stops generating for a client that went away: direct vs through the gateway.

Starts the real vLLM (CPU, tiny model) and the gateway in front of it, then, alternating, sends
a long streamed completion (n=64, max_tokens=480, ignore_eos) straight to the engine or through
the gateway, drops the client after 0.5 s, and times how long vLLM's own
`vllm:num_requests_running` takes to reach 0.

    .venv/bin/python bench/disconnect.py [--trials 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.app import create_app
from gateway.keys import SUPERVISOR
from tests.helpers import free_port, gateway_config
from tests.real_engine import RealEngine, start_engine, stop_process_group

BODY = {
    "model": "tiny",
    "prompt": "Once upon a time",
    "n": 64,
    "max_tokens": 480,
    "ignore_eos": True,
    "stream": True,
}


async def running(engine: RealEngine) -> float:
    return await asyncio.to_thread(engine.metric, "vllm:num_requests_running")


async def one_trial(base: str, engine: RealEngine) -> tuple[float, float]:
    """(running just before the drop, seconds from the drop until the engine is idle)."""
    async with aiohttp.ClientSession() as session:
        resp = await session.post(base + "/v1/completions", json=BODY)
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            await asyncio.wait_for(resp.content.readany(), timeout=10)
        before = await running(engine)
        dropped = time.monotonic()
        resp.close()
    while await running(engine) > 0:
        if time.monotonic() - dropped > 30:
            return before, float("inf")
        await asyncio.sleep(0.01)
    return before, time.monotonic() - dropped


async def main(trials: int) -> None:
    log = Path(tempfile.mkdtemp()) / "vllm.log"
    proc, url = start_engine(log)
    engine = RealEngine(url=url, pid=proc.pid, log_path=log)
    config = gateway_config(url, defaults={"max_n": 64, "max_tokens_limit": 480})
    app = create_app(config)
    server = TestServer(app, host="127.0.0.1", port=free_port(), handler_cancellation=True)
    try:
        await server.start_server()
        assert await app[SUPERVISOR].wait_ready(120)
        via = str(server.make_url("")).rstrip("/")
        results: dict[str, list[float]] = {"direct": [], "gateway": []}
        for _ in range(trials):
            for name, base in (("direct", url), ("gateway", via)):
                before, idle = await one_trial(base, engine)
                results[name].append(idle)
                print(f"{name:8s} running before drop {before:4.0f}  idle after {idle:.3f} s")
        print()
        for name, times in results.items():
            print(
                f"{name:8s} median {statistics.median(times):.3f} s  "
                f"max {max(times):.3f} s  over {trials} trials"
            )
    finally:
        await server.close()
        stop_process_group(proc.pid)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=5)
    asyncio.run(main(parser.parse_args().trials))
