"""The load test (loadtest/run.py, `make loadtest`) as a subprocess: a short run against the
emulator behind the gateway passes, and a run that meets an unexpected status or no answer
fails. Durations are short so that the suite stays quick; `make loadtest` runs it for a minute."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "loadtest" / "run.py"


async def run_loadtest(*args: str, timeout: float = 180.0) -> tuple[int, str, dict[str, Any]]:
    """Run loadtest/run.py with `args`; its exit status, output and JSON summary."""
    summary = Path(args[args.index("--summary-json") + 1])
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(RUN),
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(errors="replace"), read_summary(summary)


def read_summary(path: Path) -> dict[str, Any]:
    """The JSON summary the locustfile wrote, or {} when it wrote none."""
    return dict(json.loads(path.read_text())) if path.exists() else {}


async def test_ten_second_run_against_the_emulator_passes(tmp_path: Path) -> None:
    """`make loadtest`'s run (emulator behind a supervised gateway, the whole mix) exits 0,
    sent requests, and met every expected status: 200s and the 400s of over-long prompts and
    malformed bodies, with time to first token recorded for streams."""
    summary = tmp_path / "summary.json"
    rc, out, report = await run_loadtest(
        "--duration", "10", "--users", "8", "--summary-json", str(summary)
    )
    assert rc == 0, out[-4000:]
    assert report["requests"] > 10, out[-4000:]
    assert report["unexpected"] == 0
    assert report["unanswered"] == 0
    tasks = report["tasks"]
    assert tasks["chat"]["statuses"].get("200", 0) > 0
    assert tasks["chat stream"]["ttft_ms_p50"] is not None
    assert "0 gateway_bug lines" in out


def failing_app() -> web.Application:
    """An endpoint that answers every generation with a 500 in the OpenAI envelope."""

    async def broken(_request: web.Request) -> web.Response:
        return web.json_response(
            {"error": {"message": "boom", "type": "InternalServerError", "code": 500}},
            status=500,
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", broken)
    app.router.add_post("/v1/completions", broken)
    return app


@pytest.mark.parametrize("target", ["answers 500", "refuses connections"])
async def test_unexpected_status_or_no_answer_fails_the_run(tmp_path: Path, target: str) -> None:
    """Against a stack that answers 500, or against a closed port, the load test exits 1 and
    its summary names the unexpected status or the unanswered requests."""
    summary = tmp_path / "summary.json"
    server: TestServer | None = None
    if target == "answers 500":
        server = TestServer(failing_app(), host="127.0.0.1")
        await server.start_server()
        host = f"http://127.0.0.1:{server.port}"
    else:
        host = f"http://127.0.0.1:{free_port()}"
    try:
        rc, out, report = await run_loadtest(
            "--host",
            host,
            "--duration",
            "4",
            "--users",
            "2",
            "--spawn-rate",
            "2",
            "--summary-json",
            str(summary),
        )
    finally:
        if server is not None:
            await server.close()
    assert rc == 1, out[-4000:]
    assert report["unexpected"] > 0, out[-4000:]
    reasons = {why for task in report["tasks"].values() for why in task["unexpected"]}
    if target == "answers 500":
        assert "status 500" in reasons
    else:
        assert reasons == {"no answer"}
        assert report["unanswered"] == report["unexpected"]
