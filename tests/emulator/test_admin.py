"""The operator's listener over real sockets: the bearer token off loopback, the status view
and `vllm-guard status`, restarting the engine (409 in the sidecar shape), the engine's
version, and every action logged."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
import yaml
from aiohttp.test_utils import TestServer

from engine.emulator import EmulatorSettings, create_emulator_app
from engine.state import EngineState
from gateway.app import create_app
from gateway.cli import main
from gateway.config import ConfigError, load_config
from gateway.keys import ADMIN_APP, SUPERVISOR
from tests.helpers import (
    MODEL_DIR,
    base_url,
    emulator_section,
    error_envelope,
    free_port,
    run_fake_upstream,
    until,
)

TIMINGS: dict[str, Any] = {
    "probe_interval_s": 0.5,
    "startup_probe_interval_s": 0.1,
    "probe_timeout_s": 5,
    "restart_backoff_s": 0.1,
    "stop_grace_s": 2,
}


def write(path: Path, engine: dict[str, Any], **admin: Any) -> Path:
    data = {
        "server": {"host": "127.0.0.1", "port": 0},
        "admin": {"enabled": True, "host": "127.0.0.1", "port": free_port(), **admin},
        "engine": engine,
        "models": {"tiny": {"tokenizer": str(MODEL_DIR), "default_max_tokens": 5}},
        "logging": {"format": "json"},
    }
    tmp = path.with_name(".tmp.yaml")
    tmp.write_text(yaml.safe_dump(data), encoding="utf-8")
    os.replace(tmp, path)
    return path


@asynccontextmanager
async def emulator(**settings: Any) -> AsyncIterator[str]:
    server = await run_fake_upstream(create_emulator_app(EmulatorSettings(**settings)))
    try:
        yield base_url(server)
    finally:
        await server.close()


@asynccontextmanager
async def gateway(path: Path, *, timeout: float = 30) -> AsyncIterator[tuple[TestServer, str]]:
    """The gateway made from `path`, and its admin listener's URL (bound on loopback here,
    whatever admin.host says: the token rule follows admin.host)."""
    app = create_app(load_config(path), config_path=path)
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    admin = TestServer(app[ADMIN_APP], host="127.0.0.1", port=free_port())
    await admin.start_server()
    try:
        assert await app[SUPERVISOR].wait_ready(timeout)
        yield server, base_url(admin)
    finally:
        await admin.close()
        await server.close()


async def test_off_loopback_the_admin_listener_needs_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bound off loopback without a token the gateway refuses to start (naming the variable);
    with one, a request without it or with a wrong one is a 401 in the envelope (logged as a
    warning) and the right one passes."""
    monkeypatch.delenv("GUARD_TEST_TOKEN", raising=False)
    async with emulator() as url:
        path = write(
            tmp_path / "config.yaml", {"url": url}, host="0.0.0.0", token_env="GUARD_TEST_TOKEN"
        )
        with pytest.raises(ConfigError, match="GUARD_TEST_TOKEN"):
            create_app(load_config(path), config_path=path)
        assert main(["run", "--config", str(path)]) == 1
        assert "GUARD_TEST_TOKEN" in capsys.readouterr().err
        monkeypatch.setenv("GUARD_TEST_TOKEN", "t0ken")
        async with gateway(path) as (_, admin), aiohttp.ClientSession() as session:
            with structlog.testing.capture_logs() as logs:
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "t0ken"}):
                    async with session.get(admin + "/status", headers=headers) as resp:
                        assert resp.status == 401
                        error_envelope(await resp.json(), 401)
                async with session.post(admin + "/reload", headers={}) as resp:
                    assert resp.status == 401
                auth = {"Authorization": "Bearer t0ken"}
                async with session.get(admin + "/status", headers=auth) as resp:
                    assert resp.status == 200
    refused = [e for e in logs if e["event"] == "admin_request" and e["status"] == 401]
    assert len(refused) == 4
    assert all(e["log_level"] == "warning" for e in refused)


async def test_loopback_needs_no_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On loopback the admin listener answers without a token, even when none is set."""
    monkeypatch.delenv("VLLM_GUARD_ADMIN_TOKEN", raising=False)
    async with emulator() as url:
        path = write(tmp_path / "config.yaml", {"url": url})
        async with (
            gateway(path) as (_, admin),
            aiohttp.ClientSession() as session,
            session.get(admin + "/suspects") as resp,
        ):
            assert resp.status == 200
            assert (await resp.json()) == {"suspects": []}


async def test_status_command_prints_the_view(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vllm-guard status` prints, for a person, the generation, the engine's state, version
    and recent changes, and the effective values with their sources; --json the same data."""
    async with emulator() as url:
        engine = {"url": url, "env": {"SECRET": "hunter2"}, **TIMINGS}
        path = write(tmp_path / "config.yaml", engine)
        async with gateway(path) as (server, admin):
            assert await until(lambda: server.app[SUPERVISOR].is_ready(), 10)
            with structlog.testing.capture_logs() as logs:
                assert await asyncio.to_thread(main, ["status", "--url", admin]) == 0
                text = capsys.readouterr().out
                assert await asyncio.to_thread(main, ["status", "--url", admin, "--json"]) == 0
                as_json = capsys.readouterr().out
    assert f"config      {path}  generation 1" in text
    assert "engine      ready  (sidecar, epoch 1, version 0.32.0)" in text
    assert "models      tiny (max_model_len 512)" in text
    assert "starting -> ready" in text
    assert "default_max_tokens = 5  [file (models.tiny.default_max_tokens)]" in text
    assert "context_length = 512  [engine]" in text
    assert "engine.env = {'SECRET': '<redacted>'}" in text
    assert "hunter2" not in text + as_json
    assert '"generation": 1' in as_json
    assert [e["path"] for e in logs if e["event"] == "admin_request"] == ["/status", "/status"]


async def test_restart_is_409_in_the_sidecar_shape(tmp_path: Path) -> None:
    """The sidecar's engine is not the gateway's to restart: 409 in the error envelope."""
    async with emulator() as url:
        path = write(tmp_path / "config.yaml", {"url": url, **TIMINGS})
        async with gateway(path) as (_, admin), aiohttp.ClientSession() as session:
            async with session.post(admin + "/engine/restart") as resp:
                assert resp.status == 409
                error = error_envelope(await resp.json(), 409)
            assert "sidecar" in error["message"]


async def test_a_new_engine_command_applies_at_the_restart_the_operator_asks(
    tmp_path: Path,
) -> None:
    """A reloaded engine command is named as waiting for the next engine restart; POST
    /engine/restart restarts the supervised engine (a new process, a new epoch, the reason in
    the recent changes) with it, and the pending note clears."""
    port = free_port()
    path = tmp_path / "config.yaml"
    write(path, emulator_section(port, timings=TIMINGS))
    async with gateway(path, timeout=60) as (server, admin):
        supervisor = server.app[SUPERVISOR]
        first_pid = supervisor.pid
        write(path, emulator_section(port, "--latency-ms", "1", timings=TIMINGS))
        async with aiohttp.ClientSession() as session:
            async with session.post(admin + "/reload") as resp:
                result = await resp.json()
            assert result["at_engine_restart"] == ["engine.command"]
            async with session.get(admin + "/status") as resp:
                assert (await resp.json())["config"]["pending_engine_restart"] == ["engine.command"]
            assert supervisor.pid == first_pid  # not restarted by the reload itself
            async with session.post(admin + "/engine/restart") as resp:
                assert resp.status == 202
            assert await until(lambda: supervisor.is_ready() and supervisor.epoch == 2, 60)
            assert supervisor.pid != first_pid
            async with session.get(admin + "/engine") as resp:
                view = await resp.json()
            async with session.get(admin + "/status") as resp:
                status = await resp.json()
    assert status["config"]["pending_engine_restart"] == []
    effective = status["effective"]
    reasons = [c["reason"] for c in view["recent_changes"]]
    assert "restart requested: asked on the admin listener" in reasons
    assert view["recent_changes"][0]["to"] == EngineState.READY.value
    assert "--latency-ms" in effective["engine"]["command"]["value"]


async def test_engine_version_logged_and_untested_warned(tmp_path: Path) -> None:
    """The engine's /version is logged when it is ready; outside 0.32.x it is a warning."""
    for version, event in (("0.32.0", "engine_version"), ("0.31.2", "engine_version_untested")):
        async with emulator(version=version) as url:
            path = write(tmp_path / "config.yaml", {"url": url, **TIMINGS})
            with structlog.testing.capture_logs() as logs:
                async with gateway(path) as (_, admin):
                    assert await until(lambda: any("version" in e["event"] for e in logs), 10)
                    async with (
                        aiohttp.ClientSession() as session,
                        session.get(admin + "/engine") as resp,
                    ):
                        assert (await resp.json())["version"] == version
        found = [e for e in logs if e["event"].startswith("engine_version")]
        assert [e["event"] for e in found] == [event]
        assert found[0]["version"] == version
