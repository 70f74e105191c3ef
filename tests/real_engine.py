"""The real vLLM as a subprocess: its command line and environment, starting it on a free port
until it really generated a token, stopping its process group, and what tests read from it
(its access log, its /metrics). The `real_engine` fixture (tests/conftest.py) runs one per
session; bench/ scripts use the same functions."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers import MODEL_DIR, ROOT, free_port

ENGINE_PYTHON = ROOT / ".venv-engine" / "bin" / "python"
MODEL_NAME = "tiny"
MAX_MODEL_LEN = 512


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
