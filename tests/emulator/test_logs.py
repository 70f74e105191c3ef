"""The canonical log line: one `request_finished` per request, with what the gateway did."""

from __future__ import annotations

from typing import Any

import aiohttp
import structlog

from engine.emulator import EmulatorSettings, create_emulator_app
from tests.helpers import MODEL_DIR, gateway_config, run_fake_upstream

FIELDS = {
    "request_id",
    "method",
    "path",
    "model",
    "status",
    "outcome",
    "bytes",
    "ttfb_ms",
    "duration_ms",
}


async def test_one_request_finished_line_per_request(gateway_server: Any) -> None:
    """Each request, admitted or refused, logs exactly one request_finished line with the
    canonical fields and what admission did."""
    emulator = await run_fake_upstream(create_emulator_app(EmulatorSettings(tokenizer=MODEL_DIR)))
    try:
        config = gateway_config(
            str(emulator.make_url("")).rstrip("/"),
            models={
                "tiny": {
                    "tokenizer": str(MODEL_DIR),
                    "token_source": "local",
                    "default_max_tokens": 5,
                }
            },
        )
        server = await gateway_server(config)
        with structlog.testing.capture_logs() as logs:
            async with aiohttp.ClientSession() as session:
                async with session.post(
                    server.make_url("/v1/chat/completions"),
                    json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
                    headers={"X-Request-Id": "req-1"},
                ) as resp:
                    assert resp.status == 200
                    body = await resp.read()
                async with session.post(
                    server.make_url("/v1/completions"),
                    json={"model": "tiny", "prompt": "x", "n": 99},
                    headers={"X-Request-Id": "req-2"},
                ) as resp:
                    assert resp.status == 400
    finally:
        await emulator.close()
    finished = [e for e in logs if e["event"] == "request_finished"]
    assert [e["request_id"] for e in finished] == ["req-1", "req-2"]
    ok, refused = finished
    assert set(ok) >= FIELDS
    assert (ok["method"], ok["path"], ok["model"], ok["status"]) == (
        "POST",
        "/v1/chat/completions",
        "tiny",
        200,
    )
    assert ok["bytes"] == len(body)
    assert ok["max_tokens_action"] == "defaulted"
    assert ok["max_tokens"] == 5
    assert ok["prompt_tokens"] > 0
    assert 0 <= ok["ttfb_ms"] <= ok["duration_ms"]
    assert refused["status"] == 400
    assert refused["outcome"] == "rejected"
    assert refused["reason"] == "max_n"
