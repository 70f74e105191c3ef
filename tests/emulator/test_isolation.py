"""Failure isolation end to end: the gateway supervising the emulator, which fails on demand."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import aiohttp

from engine.state import StateChange
from gateway.keys import SUPERVISOR
from tests.helpers import (
    CHAT_PATH,
    MODEL_DIR,
    Gateway,
    StartGateway,
    base_url,
    chat,
    emulator_section,
    free_port,
    gateway_config,
    send,
    stream_summary,
    until,
)

POISON = "POISON-7f3a"
HANG = "HANG-91c2"


TIMINGS: dict[str, Any] = {
    "probe_interval_s": 0.5,
    "startup_probe_interval_s": 0.1,
    "probe_timeout_s": 2,
    "health_failures": 2,
    "restart_backoff_s": 0.1,
    "restart_backoff_max_s": 0.5,
    "stop_grace_s": 2,
    "wedge_timeout_s": 2,
    "wedge_check_interval_s": 0.25,
    "max_restarts": 10,
}


def _config(
    *flags: str,
    isolation: dict[str, Any] | None = None,
    policy: dict[str, Any] | None = None,
    **timings: Any,
) -> Any:
    port = free_port()
    return gateway_config(
        f"http://127.0.0.1:{port}",
        engine=emulator_section(
            port, "--tokenizer", str(MODEL_DIR), *flags, timings=TIMINGS, **timings
        ),
        admin={"enabled": True, "port": free_port()},
        models={
            "tiny": {
                "tokenizer": str(MODEL_DIR),
                "token_source": "local",
                "deadline_s": 90,
                **(policy or {}),
            }
        },
        isolation={
            "probation_timeout_s": 20,
            "queue_timeout_s": 60,
            "queue_max": 512,
            **(isolation or {}),
        },
    )


class Deaths:
    """Counts engine failures (READY → anything else) seen by the supervisor."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, change: StateChange) -> None:
        if change.old.value == "ready" and change.new.value in {"failed", "given_up"}:
            self.count += 1


async def _start(gateway_server: StartGateway, config: Any) -> tuple[Gateway, Deaths, str]:
    server = await gateway_server(config, timeout=60)
    deaths = Deaths()
    server.app[SUPERVISOR].subscribe(deaths)
    return server, deaths, base_url(server)


async def _send(
    session: aiohttp.ClientSession, base: str, body: dict[str, Any], timeout: float = 120
) -> dict[str, Any]:
    """One chat request; for a stream, also the text it assembled and whether it ended in an
    error."""
    out = await send(session, base + CHAT_PATH, body, timeout)
    if "events" in out:
        out.update(stream_summary(out["events"]))
    return out


async def test_the_original_crash_cannot_happen(gateway_server: Any) -> None:
    """kserve#3971: behind the gateway, 1,000 chat requests without max_tokens (some
    concurrent) to an engine with the multi-step bug all succeed and the engine never dies."""
    server, deaths, base = await _start(
        gateway_server,
        _config("--multi-step-bug", "--on-death", "exit", policy={"default_max_tokens": 4}),
    )
    epoch = server.app[SUPERVISOR].epoch
    statuses: list[int] = []

    async def worker(session: aiohttp.ClientSession, n: int, w: int) -> None:
        for i in range(n):
            result = await _send(session, base, chat(f"hello {w}-{i}", max_tokens=None), 30)
            statuses.append(result["status"])

    async with aiohttp.ClientSession() as session:
        # 200 one at a time, then 800 by 16 concurrent clients.
        await worker(session, 200, -1)
        await asyncio.gather(*(worker(session, 50, w) for w in range(16)))
    assert len(statuses) == 1000
    assert set(statuses) == {200}
    assert deaths.count == 0
    assert server.app[SUPERVISOR].epoch == epoch


async def _expected_answers(base: str, bodies: Sequence[dict[str, Any]]) -> list[str]:
    """What the (healthy, deterministic) engine answers to each body, asked afterwards."""
    answers = []
    async with aiohttp.ClientSession() as session:
        for body in bodies:
            result = await _send(session, base, {**body, "stream": False})
            assert result["status"] == 200
            answers.append(result["json"]["choices"][0]["message"]["content"])
    return answers


async def test_a_query_of_death_is_quarantined_and_the_innocent_are_saved(
    gateway_server: Any,
) -> None:
    """50 innocent requests (half streamed) while one poison request is sent 5 times: the
    engine dies at most twice, the poison ends quarantined, every non-streamed innocent and
    every stream that had not started gets its complete answer, no stream hangs."""
    server, deaths, base = await _start(
        gateway_server, _config("--die-on", POISON, "--tokens-per-second", "40")
    )
    innocents = [chat(f"innocent number {i}", max_tokens=20, stream=i % 2 == 1) for i in range(50)]
    poison = chat(f"please {POISON} now", max_tokens=20)

    async with aiohttp.ClientSession() as session:

        async def poison_later(delay: float) -> dict[str, Any]:
            await asyncio.sleep(delay)
            return await _send(session, base, poison)

        results = await asyncio.gather(
            *(_send(session, base, body) for body in innocents),
            *(poison_later(0.2 + 0.3 * k) for k in range(5)),
        )
    innocent_results, poison_results = results[:50], results[50:]

    assert deaths.count <= 2
    assert deaths.count >= 1
    expected = await _expected_answers(base, innocents)
    cut_streams = 0
    for body, result, answer in zip(innocents, innocent_results, expected, strict=True):
        assert result["status"] == 200, result
        if not body.get("stream"):
            assert result["json"]["choices"][0]["message"]["content"] == answer
            assert result["json"]["usage"]["completion_tokens"] == 20
        elif result["error"] is None:  # whole, or resumed after the death: one answer
            assert result["text"] == answer
            assert result["done"]
            assert len(result["ids"]) == 1
            assert result["roles"] == 1
        else:  # a stream the death cut after it had started: a readable error, then the end
            cut_streams += 1
            assert result["error"]["code"] == 503
            assert result["done"]
    assert all(r["status"] in {422, 503} for r in poison_results), poison_results
    assert any(r["status"] == 422 for r in poison_results)

    # From now on the poison is answered at once, without reaching (and killing) the engine.
    epoch = server.app[SUPERVISOR].epoch
    async with aiohttp.ClientSession() as session:
        again = await _send(session, base, {**poison, "user": "someone-else", "stream": True})
    assert again["status"] == 422
    assert again["json"]["error"]["type"] == "QuarantinedRequestError"
    assert "quarantined" in again["json"]["error"]["message"]
    assert server.app[SUPERVISOR].epoch == epoch
    assert deaths.count <= 2
    print(f"engine deaths: {deaths.count}, streams cut after start: {cut_streams}")


async def test_a_wedge_is_detected_and_its_culprit_quarantined(gateway_server: Any) -> None:
    """An engine that hangs (health still 200) on one request is detected as wedged and
    restarted; the culprit is quarantined and the innocent requests are served."""
    server, deaths, base = await _start(
        gateway_server, _config("--hang-on", HANG, "--tokens-per-second", "40")
    )
    innocents = [chat(f"bystander {i}", max_tokens=10) for i in range(6)]
    culprit = chat(f"now {HANG} forever", max_tokens=10)
    async with aiohttp.ClientSession() as session:

        async def culprit_later() -> dict[str, Any]:
            await asyncio.sleep(0.1)
            return await _send(session, base, culprit)

        results = await asyncio.gather(
            *(_send(session, base, b) for b in innocents), culprit_later()
        )
    assert deaths.count >= 1
    assert all(r["status"] == 200 for r in results[:-1]), results
    assert results[-1]["status"] in {422, 503}
    async with aiohttp.ClientSession() as session:
        again = await _send(session, base, culprit)
    assert again["status"] == 422
    # The operator sees it on the admin listener, without the prompt text, and can clear it.
    assert server.admin_url is not None
    async with aiohttp.ClientSession() as session:
        async with session.get(server.admin_url + "/quarantine") as resp:
            listing = await resp.json()
        assert len(listing["quarantine"]) == 1
        assert HANG not in json.dumps(listing)
        assert listing["quarantine"][0]["model"] == "tiny"
        async with session.delete(server.admin_url + "/quarantine") as resp:
            assert (await resp.json())["cleared"] == 1


async def test_overload_gets_429_and_nothing_is_lost(gateway_server: Any) -> None:
    """Beyond the bulkhead and its queue, requests get 429 with Retry-After; every request
    gets an answer."""
    _server, _, base = await _start(
        gateway_server,
        _config(
            "--tokens-per-second",
            "20",
            isolation={"queue_max": 3, "queue_timeout_s": 30},
            policy={"max_in_flight": 2},
        ),
    )
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(
            *(_send(session, base, chat(f"load {i}", max_tokens=10)) for i in range(12))
        )
    statuses = sorted(r["status"] for r in results)
    assert set(statuses) <= {200, 429}
    assert statuses.count(200) >= 5  # 2 in flight + 3 queued at least
    rejected = [r for r in results if r["status"] == 429]
    assert rejected, statuses
    for r in rejected:
        assert int(r["headers"]["Retry-After"]) >= 1
        assert r["json"]["error"]["type"] == "RateLimitError"


async def test_requests_are_held_while_the_engine_restarts(gateway_server: Any) -> None:
    """A request that arrives while the engine restarts waits and is answered, not failed."""
    _server, deaths, base = await _start(gateway_server, _config("--die-on", POISON))
    async with aiohttp.ClientSession() as session:
        killed = asyncio.ensure_future(_send(session, base, chat(POISON)))
        await until(lambda: deaths.count > 0, 20)
        assert deaths.count == 1
        held = await _send(session, base, chat("patient request"))
        await killed
    assert held["status"] == 200


async def test_a_started_stream_is_resumed_after_the_engine_dies(gateway_server: Any) -> None:
    """A stream the engine's death cuts after the client had bytes is resumed: the client sees
    a pause, then the rest of one answer: same text as uninterrupted, one id, one role chunk,
    the whole budget in its usage, no error event."""
    _server, deaths, base = await _start(
        gateway_server, _config("--die-on", POISON, "--tokens-per-second", "20")
    )
    body = {
        **chat("tell me a long story", max_tokens=40, stream=True),
        "stream_options": {"include_usage": True},
    }
    async with aiohttp.ClientSession() as session:
        expected = (await _send(session, base, body))["text"]
        stream = asyncio.ensure_future(_send(session, base, body))
        await asyncio.sleep(0.6)  # about a dozen tokens in
        killer = await _send(session, base, chat(POISON))
        resumed = await stream
    assert deaths.count == 2  # the poison's first run, and its run alone on probation
    assert killer["status"] == 422
    assert resumed["status"] == 200
    assert resumed["error"] is None
    assert resumed["done"]
    assert resumed["text"] == expected
    assert len(resumed["ids"]) == 1
    assert resumed["roles"] == 1
    assert resumed["usage"]["completion_tokens"] == 40
