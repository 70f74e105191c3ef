"""The readiness probe fits the engine: in front of an engine that serves only chat (the
emulator with /v1/completions off) the gateway becomes ready through chat, and a probe that
cannot succeed says why in the log and in /ready's body."""

from __future__ import annotations

from typing import Any

import aiohttp
from structlog.testing import capture_logs

from engine.supervisor import EngineSupervisor
from gateway.keys import SUPERVISOR
from tests.helpers import (
    CHAT_PATH,
    base_url,
    chat,
    emulator_section,
    free_port,
    gateway_config,
    send,
    until,
)

TIMINGS: dict[str, Any] = {
    "probe_interval_s": 0.5,
    "startup_probe_interval_s": 0.1,
    "probe_timeout_s": 3,
    "startup_timeout_s": 60,
}


def _config(*flags: str, **engine: Any) -> Any:
    port = free_port()
    return gateway_config(
        f"http://127.0.0.1:{port}",
        engine=emulator_section(port, *flags, timings=TIMINGS, **engine),
    )


async def test_emulator_flag_turns_completions_off(gateway_server: Any) -> None:
    """`--no-completions` makes the emulator answer /v1/completions 404, chat as before."""
    config = _config("--no-completions")
    server = await gateway_server(config, timeout=60)
    engine = config.engine.url
    async with aiohttp.ClientSession() as session:
        completions = await send(
            session,
            engine + "/v1/completions",
            {"model": "tiny", "prompt": "hi", "max_tokens": 1},
        )
        answered = await send(session, base_url(server) + CHAT_PATH, chat("hello"))
    assert completions["status"] == 404
    assert answered["status"] == 200


async def test_auto_probe_uses_chat_when_completions_is_not_served(gateway_server: Any) -> None:
    """With the default `engine.probe: auto`, a chat-only engine becomes ready (completions
    answered 404, chat answered), /ready is 200 and chat requests are served."""
    with capture_logs() as logs:
        server = await gateway_server(_config("--no-completions"), timeout=60)
    supervisor: EngineSupervisor = server.app[SUPERVISOR]
    async with aiohttp.ClientSession() as session:
        async with session.get(base_url(server) + "/ready") as resp:
            assert resp.status == 200
        answered = await send(session, base_url(server) + CHAT_PATH, chat("hello"))
    assert answered["status"] == 200
    assert supervisor.not_ready_reason is None
    ready = [e for e in logs if e["event"] == "engine_state" and e["to"] == "ready"]
    assert "answered on chat" in ready[0]["reason"]


async def test_auto_probe_keeps_completions_where_it_is_served(gateway_server: Any) -> None:
    """An engine that serves completions is probed there, as before."""
    with capture_logs() as logs:
        await gateway_server(_config(), timeout=60)
    ready = [e for e in logs if e["event"] == "engine_state" and e["to"] == "ready"]
    assert "answered on completions" in ready[0]["reason"]


async def test_a_failing_probe_says_why_in_the_log_and_in_ready(gateway_server: Any) -> None:
    """`engine.probe: completions` in front of a chat-only engine never gets ready; /ready's
    503 body and an `engine_state` line carry the reason, "probe generation: 404 on
    /v1/completions"."""
    reason = "probe generation: 404 on /v1/completions"
    with capture_logs() as logs:
        server = await gateway_server(
            _config("--no-completions", probe="completions"), wait_ready=False
        )
        supervisor: EngineSupervisor = server.app[SUPERVISOR]
        assert await until(lambda: supervisor.not_ready_reason == reason, 30)
        async with (
            aiohttp.ClientSession() as session,
            session.get(base_url(server) + "/ready") as resp,
        ):
            body = await resp.json()
            assert resp.status == 503
    assert body == {"status": "not ready", "engine": "starting", "reason": reason}
    noted = [e for e in logs if e["event"] == "engine_state" and e.get("reason") == reason]
    assert len(noted) == 1  # once per new reason, not once per probe
    assert noted[0]["to"] == "starting"
