"""The gateway's metrics end to end: each metric's event is made to happen (requests over real
sockets to a gateway in front of the emulator, engine faults through its flags and control)
and GET /metrics is read before and after to see the sample change."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.keys import GATE, LIFECYCLE, METRICS
from tests.helpers import (
    CHAT_PATH,
    MODEL_DIR,
    Gateway,
    StartGateway,
    chat,
    control_emulator,
    emulator_info,
    emulator_section,
    free_port,
    gateway_config,
    send,
    until,
)

POISON = "POISON-m3tr"

TIMINGS: dict[str, Any] = {
    "probe_interval_s": 0.3,
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

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(session: aiohttp.ClientSession, url: str) -> Samples:
    """Every sample of GET `url`, by name and labels."""
    async with session.get(url) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "text/plain"
        text = await resp.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when absent)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def _config(*flags: str, supervised: bool = True, **sections: Any) -> Any:
    port = free_port()
    models = sections.pop("models", {})
    return gateway_config(
        f"http://127.0.0.1:{port}",
        engine=emulator_section(
            port,
            "--tokenizer",
            str(MODEL_DIR),
            *flags,
            timings=TIMINGS,
            supervised=supervised,
            **sections.pop("engine", {}),
        ),
        models={
            "tiny": {"tokenizer": str(MODEL_DIR), "token_source": "local"},
            **models,
        },
        **sections,
    )


async def _chat(
    session: aiohttp.ClientSession, server: Gateway, body: dict[str, Any], path: str = CHAT_PATH
) -> dict[str, Any]:
    return await send(session, server.url + path, body, 60)


async def test_requests_statuses_policy_tokens_and_times(
    gateway_server: StartGateway, session: aiohttp.ClientSession
) -> None:
    """A request counts once by model, endpoint and outcome, and once by status; the policy's
    action (and a refusal's reason), the engine's usage tokens and both histograms move with
    it; a client's unknown model name is counted as "unknown", never as itself."""
    server = await gateway_server(
        _config(
            "--served-model-name",
            "tiny",
            "report",
            models={
                "tiny": {"max_tokens_limit": 16, "on_exceed": "clamp", "max_n": 2},
                "report": {"mode": "report", "max_tokens_limit": 16, "max_n": 2},
            },
        )
    )
    url = server.url + "/metrics"
    before = await scrape(session, url)
    answer = await _chat(session, server, chat("hello", max_tokens=8))
    assert answer["status"] == 200
    usage = answer["json"]["usage"]
    after = await scrape(session, url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ok = {"model": "tiny", "endpoint": "chat"}
    assert delta("vllm_guard_requests_total", **ok, outcome="ok") == 1
    # The scrape before counts too (after its own answer was made).
    assert delta("vllm_guard_responses_total", status="200") == 2
    assert delta("vllm_guard_policy_actions_total", model="tiny", action="kept") == 1
    assert delta("vllm_guard_prompt_tokens_total", model="tiny") == usage["prompt_tokens"] > 0
    assert delta("vllm_guard_completion_tokens_total", model="tiny") == usage["completion_tokens"]
    assert delta("vllm_guard_added_seconds_count", **ok) == 1
    assert delta("vllm_guard_time_to_first_byte_seconds_count", **ok) == 1
    assert 0 < delta("vllm_guard_added_seconds_sum", **ok) < 5
    assert delta("vllm_guard_added_seconds_bucket", **ok, le="120.0") == 1

    # Every action and refusal, in enforce and report mode.
    cases: list[tuple[dict[str, Any], int, str, str, str | None]] = [
        (chat("hi", max_tokens=None), 200, "tiny", "defaulted", None),
        (chat("hi", max_tokens=100), 200, "tiny", "clamped", None),
        (chat("hi", n=5), 400, "tiny", "rejected", "max_n"),
        (chat("hi", model="report", max_tokens=100), 200, "report", "would_clamp", None),
        (chat("hi", model="report", n=5), 200, "report", "would_reject", "max_n"),
    ]
    for body, status, model, action, reason in cases:
        before = await scrape(session, url)
        assert (await _chat(session, server, body))["status"] == status, body
        after = await scrape(session, url)
        assert delta("vllm_guard_policy_actions_total", model=model, action=action) == 1, action
        if reason is not None:
            assert delta("vllm_guard_policy_rejections_total", model=model, reason=reason) == 1
    assert delta("vllm_guard_requests_total", model="tiny", endpoint="chat", outcome="ok") == 0

    # An unknown model: counted under "unknown"; its name is nowhere in /metrics.
    before = await scrape(session, url)
    refused = await _chat(session, server, chat("hi", model="client-made-name-x1"))
    assert refused["status"] == 404
    after = await scrape(session, url)
    labels = {"model": "unknown", "endpoint": "chat", "outcome": "rejected"}
    assert delta("vllm_guard_requests_total", **labels) == 1
    assert delta("vllm_guard_responses_total", status="404") == 1
    async with session.get(url) as resp:
        assert "client-made-name-x1" not in await resp.text()


async def test_streams_completions_relay_and_the_engines_own_metrics(
    gateway_server: StartGateway, session: aiohttp.ClientSession
) -> None:
    """A stream's tokens are counted from its usage event when the client asked for one (and
    not otherwise); completions and relayed paths have their own endpoint label; the engine's
    metrics are at /engine/metrics and never in /metrics."""
    server = await gateway_server(_config())
    url = server.url + "/metrics"
    before = await scrape(session, url)
    with_usage = chat("hello", max_tokens=6, stream=True, stream_options={"include_usage": True})
    streamed = await _chat(session, server, with_usage)
    usage = next(e["usage"] for e in streamed["events"] if isinstance(e, dict) and e.get("usage"))
    after = await scrape(session, url)
    tokens = "vllm_guard_completion_tokens_total"
    assert value(after, tokens, model="tiny") - value(before, tokens, model="tiny") == 6
    assert usage["completion_tokens"] == 6
    ok = {"model": "tiny", "endpoint": "chat", "outcome": "ok"}
    assert value(after, "vllm_guard_requests_total", **ok) == 1

    before = after
    assert (await _chat(session, server, chat("hello", max_tokens=6, stream=True)))["status"] == 200
    completion = {"model": "tiny", "prompt": "once upon", "max_tokens": 3}
    assert (await _chat(session, server, completion, "/v1/completions"))["status"] == 200
    async with session.get(server.url + "/v1/models") as resp:
        assert resp.status == 200
    after = await scrape(session, url)
    assert value(after, tokens, model="tiny") - value(before, tokens, model="tiny") == 3
    done = {"model": "tiny", "outcome": "ok"}
    assert value(after, "vllm_guard_requests_total", **done, endpoint="completions") == 1
    relayed = {"model": "unknown", "endpoint": "relay", "outcome": "ok"}
    assert value(after, "vllm_guard_requests_total", **relayed) == 1

    async with session.get(server.url + "/engine/metrics") as resp:
        assert resp.status == 200
        engine_text = await resp.text()
    async with session.get(url) as resp:
        own_text = await resp.text()
    assert "vllm:" in engine_text
    assert "vllm_guard_" not in engine_text
    assert "vllm:" not in own_text


async def test_in_flight_queued_and_shed_by_cause(
    gateway_server: StartGateway, session: aiohttp.ClientSession
) -> None:
    """While a slow request holds the bulkhead of one, the next waits: in flight and queued
    by model show them; past the queue a request is shed 429 queue_full, a wait past
    queue_timeout_s is shed 429 bulkhead, and a draining gateway sheds 503 draining."""
    server = await gateway_server(
        _config(
            "--tokens-per-second",
            "5",
            isolation={"queue_max": 1, "queue_timeout_s": 1.5},
            models={"tiny": {"max_in_flight": 1}},
        )
    )
    url = server.url + "/metrics"
    slow = asyncio.ensure_future(_chat(session, server, chat("slow", max_tokens=20)))
    gate = server.app[GATE]
    assert await until(lambda: gate.in_flight_by_model().get("tiny") == 1, 10)
    waiting = asyncio.ensure_future(_chat(session, server, chat("waits", max_tokens=1)))
    assert await until(lambda: gate.waiting_by_model(), 10)
    now = await scrape(session, url)
    assert value(now, "vllm_guard_in_flight", model="tiny") == 1
    assert value(now, "vllm_guard_queued", model="tiny") == 1
    full = await _chat(session, server, chat("no room", max_tokens=1))
    assert full["status"] == 429
    timed_out = await waiting
    assert timed_out["status"] == 429
    after = await scrape(session, url)
    assert value(after, "vllm_guard_shed_total", status="429", cause="queue_full") == 1
    assert value(after, "vllm_guard_shed_total", status="429", cause="bulkhead") == 1
    assert value(after, "vllm_guard_queued", model="tiny") == 0
    assert (await slow)["status"] == 200
    assert value(await scrape(session, url), "vllm_guard_in_flight", model="tiny") == 0

    server.app[LIFECYCLE].draining = True
    assert (await _chat(session, server, chat("late")))["status"] == 503
    server.app[LIFECYCLE].draining = False
    after = await scrape(session, url)
    assert value(after, "vllm_guard_shed_total", status="503", cause="draining") == 1


async def test_a_sidecar_engine_not_up_yet_sheds_engine_starting(
    gateway_server: StartGateway, session: aiohttp.ClientSession
) -> None:
    """In the sidecar shape, with no engine up yet, a request is shed 503 engine_starting and
    the engine state gauge says starting."""
    server = await gateway_server(_config(supervised=False), wait_ready=False)
    answer = await _chat(session, server, chat("anyone?"))
    assert answer["status"] == 503
    now = await scrape(session, server.url + "/metrics")
    assert value(now, "vllm_guard_shed_total", status="503", cause="engine_starting") == 1
    assert value(now, "vllm_guard_engine_state", state="starting") == 1
    assert value(now, "vllm_guard_engine_state", state="ready") == 0


async def test_engine_failures_by_cause_restarts_and_start_duration(
    gateway_server: StartGateway, session: aiohttp.ClientSession
) -> None:
    """A failing /health and a wedge each count a failure by cause and a restart; the state
    gauge follows the engine back to ready, and the last start's duration is measured."""
    config = _config("--control", "--tokens-per-second", "20")
    server = await gateway_server(config)
    url = server.url + "/metrics"
    port = int(config.engine.url.rsplit(":", 1)[1])
    first = await scrape(session, url)
    assert value(first, "vllm_guard_engine_state", state="ready") == 1
    assert value(first, "vllm_guard_engine_last_start_seconds") > 0
    assert value(first, "vllm_guard_engine_restarts_total") == 0

    await emulator_info(session, port)
    await control_emulator(session, port, health=503)

    async def restarted(count: int) -> bool:
        now = await scrape(session, url)
        return (
            value(now, "vllm_guard_engine_restarts_total") >= count
            and value(now, "vllm_guard_engine_state", state="ready") == 1
        )

    assert await _poll(lambda: restarted(1), 30)
    now = await scrape(session, url)
    assert value(now, "vllm_guard_engine_failures_total", cause="health") == 1

    await emulator_info(session, port)
    stuck = asyncio.ensure_future(_chat(session, server, chat("stuck", max_tokens=200)))
    gate = server.app[GATE]
    assert await until(lambda: gate.in_flight_by_model(), 10)
    await control_emulator(session, port, hang=True)
    assert await _poll(lambda: restarted(2), 60)
    now = await scrape(session, url)
    assert value(now, "vllm_guard_engine_failures_total", cause="wedge") == 1
    assert value(now, "vllm_guard_engine_failures_total", cause="exit") == 0
    await stuck


async def test_an_engine_that_never_comes_up_fails_by_probe_and_exit_then_gives_up(
    gateway_server: StartGateway, session: aiohttp.ClientSession
) -> None:
    """An engine that is not ready within startup_timeout_s fails by probe; one whose command
    exits at once fails by exit; after max_restarts the state is given_up and requests are
    shed 503 given_up."""
    config = _config(
        "--startup-delay-s",
        "30",
        engine={"startup_timeout_s": 1, "max_restarts": 1},
    )
    server = await gateway_server(config, wait_ready=False)
    url = server.url + "/metrics"

    async def given_up() -> bool:
        return value(await scrape(session, url), "vllm_guard_engine_state", state="given_up") == 1

    assert await _poll(given_up, 30)
    now = await scrape(session, url)
    assert value(now, "vllm_guard_engine_failures_total", cause="probe") == 2
    assert value(now, "vllm_guard_engine_restarts_total") == 1
    assert (await _chat(session, server, chat("anyone?")))["status"] == 503
    now = await scrape(session, url)
    assert value(now, "vllm_guard_shed_total", status="503", cause="given_up") == 1

    exiting = gateway_config(
        f"http://127.0.0.1:{free_port()}",
        engine={
            **TIMINGS,
            "url": f"http://127.0.0.1:{free_port()}",
            "command": [sys.executable, "-c", "raise SystemExit(3)"],
            "max_restarts": 1,
        },
    )
    server = await gateway_server(exiting, wait_ready=False)
    url = server.url + "/metrics"
    assert await _poll(given_up, 30)
    now = await scrape(session, url)
    assert value(now, "vllm_guard_engine_failures_total", cause="exit") == 2


async def test_quarantine_suspects_and_probation(
    gateway_server: StartGateway, session: aiohttp.ClientSession
) -> None:
    """A poison request with two innocents in flight: all three become suspects and run alone
    on probation; the quick innocent is acquitted, the slow one times out alone, the poison is
    the culprit and is quarantined; an identical request is a quarantine hit, and the entry
    later expires."""
    config = _config(
        "--die-on",
        POISON,
        "--tokens-per-second",
        "4",
        isolation={"probation_timeout_s": 1, "quarantine_ttl_s": 30, "queue_timeout_s": 60},
        models={"tiny": {"deadline_s": 120}},
    )
    server = await gateway_server(config)
    url = server.url + "/metrics"
    gate = server.app[GATE]
    quick = asyncio.ensure_future(_chat(session, server, chat("quick one", max_tokens=2)))
    slow = asyncio.ensure_future(_chat(session, server, chat("slow one", max_tokens=60)))
    assert await until(lambda: gate.in_flight_by_model().get("tiny") == 2, 10)
    poison = await _chat(session, server, chat(f"the {POISON} here", max_tokens=2))
    assert poison["status"] in {422, 503}
    results = await asyncio.gather(quick, slow)
    assert results[0]["status"] == 200
    assert results[1]["status"] == 503  # alone past solo_limit(): the probation timeout
    now = await scrape(session, url)
    assert value(now, "vllm_guard_quarantine_added_total") == 1
    assert value(now, "vllm_guard_quarantine_entries") == 1
    assert value(now, "vllm_guard_probation_runs_total") >= 3
    assert value(now, "vllm_guard_probation_verdicts_total", verdict="culprit") == 1
    assert value(now, "vllm_guard_probation_verdicts_total", verdict="innocent") >= 1
    assert value(now, "vllm_guard_probation_verdicts_total", verdict="timeout") == 1
    assert value(now, "vllm_guard_suspects") >= 1  # the slow one: never acquitted

    again = await _chat(session, server, chat(f"the {POISON} here", max_tokens=2))
    assert again["status"] == 422
    now = await scrape(session, url)
    hits = 1 + (poison["status"] == 422)  # the culprit itself is refused once found
    assert value(now, "vllm_guard_quarantine_hits_total") == hits
    assert value(now, "vllm_guard_quarantine_expired_total") == 0

    gate.wall_clock = lambda: 1e12  # far in the future: every entry has expired
    now = await scrape(session, url)
    assert value(now, "vllm_guard_quarantine_entries") == 0
    assert value(now, "vllm_guard_quarantine_expired_total") == 1
    assert value(now, "vllm_guard_suspects") == 0


async def test_reloads_by_result_generation_and_time(
    gateway_server: StartGateway, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """An applied, an unchanged and an invalid reload each count under their result; the
    generation follows applied reloads and the last attempt's time is exported."""
    config = _config(admin={"enabled": True, "port": free_port()})
    data = config.model_dump(mode="json", exclude_defaults=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    from gateway.app import create_app
    from gateway.serve import listen

    app = create_app(config, config_path=path)
    gateway = Gateway(await listen(app, config), config)
    try:
        url = gateway.url + "/metrics"
        admin = gateway.admin_url
        assert admin is not None
        now = await scrape(session, url)
        assert value(now, "vllm_guard_config_generation") == 1
        assert value(now, "vllm_guard_config_last_reload_timestamp_seconds") == 0

        data["models"]["tiny"]["max_tokens_limit"] = 99
        path.write_text(yaml.safe_dump(data))
        for _ in range(2):  # a change, then the same file again
            async with session.post(admin + "/reload") as resp:
                assert resp.status == 200, await resp.text()
        path.write_text("models: [not, a, mapping\n")
        async with session.post(admin + "/reload") as resp:
            assert resp.status in {200, 422}, await resp.text()
        now = await scrape(session, url)
        assert value(now, "vllm_guard_config_reloads_total", result="applied") == 1
        assert value(now, "vllm_guard_config_reloads_total", result="unchanged") == 1
        assert value(now, "vllm_guard_config_reloads_total", result="invalid") == 1
        assert value(now, "vllm_guard_config_generation") == 3
        assert value(now, "vllm_guard_config_last_reload_timestamp_seconds") > 1.7e9
    finally:
        await gateway.close()


async def test_metrics_on_the_admin_listener_or_off(
    gateway_server: StartGateway, session: aiohttp.ClientSession
) -> None:
    """metrics.listener admin serves /metrics and /engine/metrics there and not on the client
    port; metrics.enabled false serves them nowhere."""
    admin = {"enabled": True, "port": free_port()}
    server = await gateway_server(_config(admin=admin, metrics={"listener": "admin"}))
    assert server.admin_url is not None
    assert value(await scrape(session, server.admin_url + "/metrics"), "vllm_guard_suspects") == 0
    async with session.get(server.admin_url + "/engine/metrics") as resp:
        assert resp.status == 200
        assert "vllm:" in await resp.text()
    async with session.get(server.url + "/metrics") as resp:
        assert resp.status == 404

    off = await gateway_server(
        _config(admin=admin | {"port": free_port()}, metrics={"enabled": False})
    )
    assert METRICS not in off.app
    for base in (off.url, off.admin_url):
        async with session.get(f"{base}/metrics") as resp:
            assert resp.status == 404


async def test_the_hooks_for_the_shared_store_and_client_write_timeouts(
    gateway_server: StartGateway, session: aiohttp.ClientSession
) -> None:
    """vllm_guard_shared_store_up is absent until the shared quarantine registers it, then
    reads its state at each scrape; client write timeouts count by bounded model."""
    server = await gateway_server(_config())
    url = server.url + "/metrics"
    async with session.get(url) as resp:
        assert "vllm_guard_shared_store_up" not in await resp.text()
    up = [True]
    metrics = server.app[METRICS]
    metrics.watch_shared_store(lambda: up[0])
    assert value(await scrape(session, url), "vllm_guard_shared_store_up") == 1
    up[0] = False
    assert value(await scrape(session, url), "vllm_guard_shared_store_up") == 0
    metrics.client_write_timeout("tiny")
    metrics.client_write_timeout("a-client-string")
    now = await scrape(session, url)
    assert value(now, "vllm_guard_client_write_timeouts_total", model="tiny") == 1
    assert value(now, "vllm_guard_client_write_timeouts_total", model="unknown") == 1


async def _poll(check: Any, timeout: float) -> bool:
    """Await `check()` until true or `timeout` passes (every 0.2 s)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True
