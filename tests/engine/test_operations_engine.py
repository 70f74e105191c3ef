"""Live reload and the operator's view in front of the real vLLM: its version is read and
counted as tested, its context length shows as engine-discovered, a reload applies to the next
real generation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
import yaml
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.config import load_config
from gateway.keys import ADMIN_APP, ENGINE_HISTORY, SUPERVISOR
from gateway.policy import HEADER_MAX_TOKENS
from tests.helpers import CHAT_PATH, MODEL_DIR, base_url, chat, free_port, send, until
from tests.real_engine import RealEngine

pytestmark = pytest.mark.engine


def _write(path: Path, url: str, limit: int) -> None:
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "engine": {"url": url, "probe_interval_s": 1, "probe_timeout_s": 30},
        "models": {"tiny": {"tokenizer": str(MODEL_DIR), "max_tokens_limit": limit}},
        "logging": {"format": "json"},
    }
    tmp = path.with_name(".config.tmp")
    tmp.write_text(yaml.safe_dump(data), encoding="utf-8")
    os.replace(tmp, path)


async def test_real_engine_version_sources_and_a_reload(
    real_engine: RealEngine, tmp_path: Path
) -> None:
    """vLLM 0.32's /version is logged as tested; context_length reads as engine-discovered
    (512); a reload's new limit clamps the next real generation to exactly that."""
    path = tmp_path / "config.yaml"
    _write(path, real_engine.url, 8)
    app = create_app(load_config(path), config_path=path)
    server = TestServer(app, host="127.0.0.1", port=free_port())
    admin = TestServer(app[ADMIN_APP], host="127.0.0.1", port=free_port())
    with structlog.testing.capture_logs() as logs:
        await server.start_server()
        await admin.start_server()
        try:
            assert await app[SUPERVISOR].wait_ready(120)
            assert await until(lambda: app[ENGINE_HISTORY].version is not None, 30)
            async with aiohttp.ClientSession() as session:
                async with session.get(base_url(admin) + "/config") as resp:
                    view = await resp.json()
                _write(path, real_engine.url, 3)
                async with session.post(base_url(admin) + "/reload") as resp:
                    assert (await resp.json())["outcome"] == "applied"
                result = await send(
                    session, base_url(server) + CHAT_PATH, chat("hello", max_tokens=100)
                )
        finally:
            await admin.close()
            await server.close()
    versions = [e for e in logs if e["event"].startswith("engine_version")]
    assert [e["event"] for e in versions] == ["engine_version"], versions
    assert versions[0]["version"].startswith("0.32.")
    context = view["effective"]["models"]["tiny"]["policy"]["context_length"]
    assert context == {"value": 512, "source": "engine", "key": "/v1/models max_model_len"}
    assert result["status"] == 200
    assert result["headers"][HEADER_MAX_TOKENS] == "clamped 100->3"
    assert result["json"]["usage"]["completion_tokens"] <= 3
