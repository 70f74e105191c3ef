"""Shared fixtures: the real vLLM engine (started once per test session), free ports, and a
gateway app in front of any upstream."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.config import Config, parse_config
from gateway.keys import SUPERVISOR
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
ENGINE_PYTHON = ROOT / ".venv-engine" / "bin" / "python"
MODEL_DIR = ROOT / "models" / "tiny"
MODEL_NAME = "tiny"
MAX_MODEL_LEN = 512
ENGINE_TESTS = Path(__file__).resolve().parent / "engine"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests under tests/engine/ need the real vLLM: they carry the `engine` marker."""
    for item in items:
        if item.path.is_relative_to(ENGINE_TESTS):
            item.add_marker(pytest.mark.engine)


def engine_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
    )
    return env


def engine_argv(port: int, *extra: str) -> list[str]:
    return [
        str(ENGINE_PYTHON),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(MODEL_DIR),
        "--served-model-name",
        MODEL_NAME,
        "--max-model-len",
        str(MAX_MODEL_LEN),
        # float32: vllm-cpu's bfloat16 kernels use AMX where the CPU lists it, and on virtual
        # machines that list AMX without enabling it the worker dies with SIGILL (see config.yaml).
        "--dtype",
        "float32",
        "--enforce-eager",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--trust-request-chat-template",
        *extra,
    ]


def _post_json(url: str, payload: dict[str, Any], timeout: float) -> tuple[int, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


@dataclass
class RealEngine:
    url: str
    pid: int
    log_path: Path
    model: str = MODEL_NAME
    max_model_len: int = MAX_MODEL_LEN

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def access_count(self, path: str) -> int:
        """How many requests for `path` reached the engine (from its access log)."""
        return self.log_text().count(f'"POST {path} HTTP/1.1"')

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith((name + "{", name + " ")):
                total += float(line.rsplit(" ", 1)[1])
        return total


def start_engine(
    log_path: Path, *extra: str, timeout: float = 420.0
) -> tuple[subprocess.Popen[bytes], str]:
    """Start a real vLLM on a free port and wait until it really generated one token."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            engine_argv(port, *extra),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=engine_env(),
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {proc.returncode}; see {log_path}")
        with contextlib.suppress(OSError, ValueError):
            status, _ = _post_json(
                url + "/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 1}, 30
            )
            if status == 200:
                return proc, url
        time.sleep(1.0)
    stop_process_group(proc.pid)
    raise RuntimeError(f"vLLM was not ready within {timeout} s; see {log_path}")


def stop_process_group(pid: int, grace: float = 15.0) -> None:
    """SIGTERM the process group led by `pid`, then SIGKILL; never by name."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def real_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealEngine]:
    """The real vLLM on the CPU with the tiny model, shared by the whole test session."""
    if not ENGINE_PYTHON.exists() or not MODEL_DIR.exists():
        pytest.fail("the engine is not installed: run `make engine model` (make test does)")
    log_path = tmp_path_factory.mktemp("engine") / "vllm.log"
    proc, url = start_engine(log_path)
    try:
        yield RealEngine(url=url, pid=proc.pid, log_path=log_path)
    finally:
        stop_process_group(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def gateway_config(engine_url: str, **sections: Any) -> Config:
    """A gateway config for tests: the given engine, quick probes, loopback only."""
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "admin": {"enabled": False},
        "engine": {
            "url": engine_url,
            "probe_interval_s": 0.5,
            "startup_probe_interval_s": 0.2,
            "probe_timeout_s": 30,
        },
        "logging": {"format": "json"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_config(data)


@pytest.fixture
async def gateway_server() -> AsyncIterator[Callable[..., Any]]:
    """Start gateways on free loopback ports (real sockets, handler cancellation on as in
    production); optionally wait until the engine behind them is ready."""
    servers: list[TestServer] = []

    async def start(
        config: Config, *, wait_ready: bool = True, timeout: float = 120.0
    ) -> TestServer:
        app = create_app(config)
        server = TestServer(app, host="127.0.0.1", port=free_port(), handler_cancellation=True)
        await server.start_server()
        servers.append(server)
        if wait_ready:
            ok = await app[SUPERVISOR].wait_ready(timeout)
            assert ok, f"engine behind the gateway not ready: {app[SUPERVISOR].state}"
        return server

    yield start
    for server in reversed(servers):
        await server.close()


async def run_fake_upstream(app: web.Application) -> TestServer:
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    return server
