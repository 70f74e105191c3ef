"""A quarantined culprit resent with a byte changed in its whitespace is still refused, end to
end: the gateway supervising the emulator, which dies on a marker."""

from __future__ import annotations

from typing import Any

import aiohttp

from gateway.keys import SUPERVISOR
from tests.helpers import (
    CHAT_PATH,
    base_url,
    chat,
    emulator_section,
    free_port,
    gateway_config,
    send,
)

POISON = "POISON-e0d4"
TIMINGS: dict[str, Any] = {
    "probe_interval_s": 0.5,
    "startup_probe_interval_s": 0.1,
    "probe_timeout_s": 2,
    "restart_backoff_s": 0.1,
    "restart_backoff_max_s": 0.2,
    "max_restarts": 10,
}


async def test_a_culprit_with_a_trailing_space_is_still_quarantined(gateway_server: Any) -> None:
    """Once a poison is quarantined, the same poison with one trailing space (and another
    with a tab for a space) gets 422 without reaching the engine, while a request that
    differs by words is served."""
    port = free_port()
    config = gateway_config(
        f"http://127.0.0.1:{port}",
        engine=emulator_section(port, "--die-on", POISON, timings=TIMINGS),
        isolation={"queue_timeout_s": 60},
    )
    server = await gateway_server(config, timeout=60)
    base = base_url(server)
    supervisor = server.app[SUPERVISOR]
    async with aiohttp.ClientSession() as session:
        first = await send(session, base + CHAT_PATH, chat(f"please {POISON} now"), 90)
        assert first["status"] == 422, first
        assert await supervisor.wait_ready(30)  # back from the culprit's last death
        epoch = supervisor.epoch
        spaced = await send(session, base + CHAT_PATH, chat(f"please {POISON} now "), 30)
        tabbed = await send(session, base + CHAT_PATH, chat(f"please\t{POISON} now"), 30)
        other = await send(session, base + CHAT_PATH, chat("please do not die now"), 30)
    assert spaced["status"] == 422
    assert spaced["json"]["error"]["type"] == "QuarantinedRequestError"
    assert tabbed["status"] == 422
    assert other["status"] == 200  # a request that differs by a word is not refused
    assert supervisor.epoch == epoch  # the copies never reached the engine
