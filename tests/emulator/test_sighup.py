"""SIGHUP to the gateway as its own process (`python -m gateway run`): the file is reloaded,
and a new log level applies at once to every module's logger."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from engine.emulator import EmulatorSettings, create_emulator_app
from tests.helpers import (
    CHAT_PATH,
    ROOT,
    base_url,
    chat,
    free_port,
    kill_leftovers,
    run_fake_upstream,
    send,
    until,
    wait_status,
)


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(".config.yaml.tmp")
    tmp.write_text(yaml.safe_dump(data), encoding="utf-8")
    os.replace(tmp, path)


def _events(log: Path) -> list[dict[str, Any]]:
    lines = log.read_text(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


async def test_sighup_reloads_and_the_log_level_changes_live(tmp_path: Path) -> None:
    """SIGHUP on an unchanged file applies it again (trigger sighup, generation 2); a file
    setting level warning silences request_finished lines at once, and back to info they
    return, without a restart."""
    engine = await run_fake_upstream(create_emulator_app(EmulatorSettings()))
    port, admin_port = free_port(), free_port()
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "engine": {
            "url": base_url(engine),
            "probe_interval_s": 0.5,
            "startup_probe_interval_s": 0.1,
        },
        "models": {"tiny": {"token_source": "engine"}},
        "logging": {"format": "json", "level": "info"},
    }
    path = tmp_path / "config.yaml"
    _write(path, data)
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(path)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"

    def reloaded(generation: int) -> bool:
        return any(
            e["event"] == "config_reloaded" and e["generation"] == generation for e in _events(log)
        )

    try:
        async with aiohttp.ClientSession() as session:

            async def generation() -> int:
                async with session.get(f"http://127.0.0.1:{admin_port}/status") as resp:
                    return int((await resp.json())["config"]["generation"])

            async def reaches(n: int) -> bool:
                for _ in range(100):
                    if await generation() >= n:
                        return True
                    await asyncio.sleep(0.1)
                return False

            assert await wait_status(session, base + "/ready", 200, 30), log.read_text()
            proc.send_signal(signal.SIGHUP)
            assert await until(lambda: reloaded(2), 10), log.read_text()
            done = next(e for e in _events(log) if e["event"] == "config_reloaded")
            assert done["trigger"] == "sighup"

            _write(path, {**data, "logging": {"format": "json", "level": "warning"}})
            proc.send_signal(signal.SIGHUP)
            assert await reaches(3)
            quiet = await send(session, base + CHAT_PATH, chat("q"))
            assert quiet["status"] == 200
            quiet_id = quiet["headers"]["X-Request-Id"]

            _write(path, data)
            proc.send_signal(signal.SIGHUP)
            assert await reaches(4)
            loud = await send(session, base + CHAT_PATH, chat("l"))
            loud_id = loud["headers"]["X-Request-Id"]
            assert await until(
                lambda: any(e.get("request_id") == loud_id for e in _events(log)), 10
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        finally:
            kill_leftovers(proc.pid)
            await engine.close()
    finished = [e["request_id"] for e in _events(log) if e["event"] == "request_finished"]
    assert loud_id in finished
    assert quiet_id not in finished
