"""An oversized prompt is refused by a cheap lower bound, not tokenized whole: measured on the
gateway as a subprocess (`vllm-guard run`), its peak and resident memory from /proc."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer

from engine.emulator import EmulatorSettings, create_emulator_app
from tests.helpers import (
    MODEL_DIR,
    ROOT,
    base_url,
    free_port,
    kill_leftovers,
    run_fake_upstream,
    send,
    wait_status,
)

PROMPT = "ab " * 1_300_000
"""3.9 MB of text, under the 4 MiB body limit; about a million tokens for a 512 context."""
MIB = 1 << 20


def _memory_kib(pid: int) -> dict[str, int]:
    """VmHWM (peak) and VmRSS (resident) of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in {"VmHWM", "VmRSS"}:
            out[name] = int(value.split()[0])
    return out


@pytest.fixture
async def emulator() -> AsyncIterator[TestServer]:
    server = await run_fake_upstream(create_emulator_app(EmulatorSettings()))
    yield server
    await server.close()


async def test_oversized_prompt_costs_no_memory(emulator: TestServer, tmp_path: Path) -> None:
    """Eight 3.9 MB prompts (a million tokens against a 512 context) are each refused 400
    for the context length, while the gateway's peak memory grows by less than 64 MiB over
    its size before them and its resident size does not grow from the first to the last."""
    port = free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": port},
        "admin": {"enabled": False},
        "engine": {"url": base_url(emulator), "probe_interval_s": 0.5},
        "models": {"tiny": {"tokenizer": str(MODEL_DIR), "token_source": "local"}},
        "logging": {"format": "json"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--config", str(path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}"
            assert await wait_status(session, url + "/ready", 200, 60)
            small = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
            assert (await send(session, url + "/v1/completions", small))["status"] == 200
            before = _memory_kib(proc.pid)
            body = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 8}).encode()
            resident = []
            for _ in range(8):
                async with session.post(
                    url + "/v1/completions",
                    data=io.BytesIO(body),  # in chunks: aiohttp warns of one 4 MB write
                    headers={"Content-Type": "application/json"},
                ) as resp:
                    assert resp.status == 400
                    assert (await resp.json())["error"]["param"] == "input_tokens"
                await asyncio.sleep(0.2)
                resident.append(_memory_kib(proc.pid)["VmRSS"])
            after = _memory_kib(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            kill_leftovers(proc.pid)
            proc.wait(timeout=5)
    peak_growth = (after["VmHWM"] - before["VmRSS"]) * 1024
    assert peak_growth < 64 * MIB, (before, after, resident)
    assert (resident[-1] - resident[0]) * 1024 < 16 * MIB, resident
