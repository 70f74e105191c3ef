"""The death window: admission's own exchange with the engine (POST /tokenize, for a prompt
the gateway counts through the engine) failing with a refused or reset connection, or answered
with a 5xx, is settled like a generation call: the request waits for the restart within its
deadline and is answered in full. Deterministic: the emulator holds a marked /tokenize open
until its process dies, or answers /tokenize a bare 500 on demand (`--control`)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from engine.process import EngineProcess
from engine.state import EngineState
from engine.supervisor import EngineSupervisor
from gateway.keys import SUPERVISOR
from tests.helpers import (
    CHAT_PATH,
    Recorder,
    base_url,
    chat,
    control_emulator,
    emulator_argv,
    emulator_section,
    error_envelope,
    free_port,
    gateway_config,
    port_open,
    send,
    stream_summary,
    until,
)

HOLD = "HOLD-3a9e"
POISON = "POISON-c71b"
TIMINGS: dict[str, Any] = {
    "probe_interval_s": 0.5,
    "startup_probe_interval_s": 0.1,
    "probe_timeout_s": 2,
    "health_failures": 2,
    "restart_backoff_s": 0.1,
    "restart_backoff_max_s": 0.2,
    "stop_grace_s": 2,
    "max_restarts": 30,
}
BY_ENGINE = {"tiny": {"token_source": "engine", "deadline_s": 90}}
"""Every prompt is counted by the engine's POST /tokenize."""


async def _answer(session: aiohttp.ClientSession, base: str, body: dict[str, Any]) -> str:
    """What the (deterministic) engine answers to `body`, asked again, not streamed."""
    result = await send(session, base + CHAT_PATH, {**body, "stream": False})
    assert result["status"] == 200, result
    content: str = result["json"]["choices"][0]["message"]["content"]
    return content


def _check_whole(result: dict[str, Any], body: dict[str, Any], answer: str) -> None:
    assert result["status"] == 200, result
    if body.get("stream"):
        summary = stream_summary(result["events"])
        assert summary["error"] is None, summary
        assert summary["text"] == answer
        assert summary["done"]
        assert len(summary["ids"]) == 1
    else:
        assert result["json"]["choices"][0]["message"]["content"] == answer


async def test_emulator_holds_a_marked_tokenize_until_the_process_dies(tmp_path: Path) -> None:
    """`--hold-tokenize-on` never answers a marked /tokenize: the process's death resets it;
    with `--hold-tokenize-once` the next process answers it normally."""
    port, once = free_port(), tmp_path / "held"
    flags = ("--hold-tokenize-on", HOLD, "--hold-tokenize-once", str(once), "--die-on", POISON)
    url = f"http://127.0.0.1:{port}"
    marked = {"model": "tiny", "prompt": f"count {HOLD} me"}
    runs = [await EngineProcess.spawn(emulator_argv(port, *flags), grace_s=2.0)]
    try:
        async with aiohttp.ClientSession() as session:
            assert await until(lambda: port_open(port), 30)
            held = asyncio.ensure_future(send(session, url + "/tokenize", marked, 60))
            assert await until(once.exists, 30)
            with pytest.raises(aiohttp.ClientError):
                await send(session, url + "/v1/completions", {"prompt": POISON, "max_tokens": 1})
            with pytest.raises(aiohttp.ClientError):
                await asyncio.wait_for(held, 30)
            runs.append(await EngineProcess.spawn(emulator_argv(port, *flags), grace_s=2.0))
            assert await until(lambda: port_open(port), 30)
            again = await send(session, url + "/tokenize", marked, 30)
        assert again["status"] == 200
        assert again["json"]["count"] > 0
    finally:
        for run in runs:
            await run.stop(2.0)


@pytest.mark.parametrize("stream", [False, True], ids=["not-streamed", "streamed"])
async def test_a_tokenize_reset_by_the_engines_death_is_settled(
    gateway_server: Any, tmp_path: Path, stream: bool
) -> None:
    """An innocent request whose /tokenize is in flight when the engine dies (held open by the
    emulator, the engine killed by a request sent straight to it) waits for the restart and is
    answered in full, instead of 503 at once."""
    port, once = free_port(), tmp_path / "held"
    flags = ("--hold-tokenize-on", HOLD, "--hold-tokenize-once", str(once), "--die-on", POISON)
    config = gateway_config(
        f"http://127.0.0.1:{port}",
        engine=emulator_section(port, *flags, timings=TIMINGS),
        models=BY_ENGINE,
    )
    server = await gateway_server(config, timeout=60)
    base = base_url(server)
    supervisor: EngineSupervisor = server.app[SUPERVISOR]
    body = chat(f"an innocent {HOLD} question", max_tokens=12, stream=stream)
    async with aiohttp.ClientSession() as session:
        innocent = asyncio.ensure_future(send(session, base + CHAT_PATH, body, 90))
        assert await until(once.exists, 30)  # its /tokenize is held at the engine
        assert not innocent.done()
        with pytest.raises(aiohttp.ClientError):  # os._exit while this is in flight
            await send(
                session,
                config.engine.url + "/v1/completions",
                {"model": "tiny", "prompt": f"die {POISON}", "max_tokens": 1},
            )
        result = await asyncio.wait_for(innocent, 90)
        answer = await _answer(session, base, body)
    _check_whole(result, body, answer)
    assert supervisor.epoch == 2


async def test_a_refused_tokenize_waits_for_the_sidecar_engine(gateway_server: Any) -> None:
    """Sidecar shape, the engine killed and not yet noticed (probes 30 s apart): the next
    request's /tokenize is refused; the gateway reports it, the probes fail the engine, the
    request is held until the kubelet's new engine is ready and is answered in full."""
    port = free_port()
    kubelet = [await EngineProcess.spawn(emulator_argv(port), grace_s=2.0)]
    try:
        config = gateway_config(
            f"http://127.0.0.1:{port}",
            engine=emulator_section(
                port, timings=TIMINGS, supervised=False, probe_interval_s=30, sidecar_hold_s=60
            ),
            models=BY_ENGINE,
        )
        server = await gateway_server(config, timeout=60)
        base = base_url(server)
        supervisor: EngineSupervisor = server.app[SUPERVISOR]
        recorder = Recorder(supervisor)
        os.killpg(kubelet[0].pid, signal.SIGKILL)
        await kubelet[0].wait()
        assert supervisor.is_ready()  # not noticed yet: the next probe is 30 s away
        body = chat("asked while the engine is gone", max_tokens=12)
        async with aiohttp.ClientSession() as session:
            innocent = asyncio.ensure_future(send(session, base + CHAT_PATH, body, 90))
            assert await until(lambda: supervisor.state is EngineState.RESTARTING, 30)
            assert not innocent.done()
            kubelet.append(await EngineProcess.spawn(emulator_argv(port), grace_s=2.0))
            result = await asyncio.wait_for(innocent, 90)
            answer = await _answer(session, base, body)
        _check_whole(result, body, answer)
        assert "ClientConnectorError" in recorder.reasons(EngineState.FAILED)[0]
    finally:
        for run in kubelet:
            await run.stop(2.0)


async def test_a_tokenize_500_from_a_dead_engine_waits_for_the_restart(
    gateway_server: Any,
) -> None:
    """The engine loop dead (killed by a request sent straight to it) and its /tokenize
    answering a bare 500, not yet noticed by the probes (30 s apart): the next request's
    /tokenize 500 is reported, the probes fail the engine, the request waits for the restart
    and is answered in full, not 502 or 500."""
    port = free_port()
    flags = ("--control", "--multi-step-bug")
    config = gateway_config(
        f"http://127.0.0.1:{port}",
        engine=emulator_section(port, *flags, timings=TIMINGS, probe_interval_s=30),
        models=BY_ENGINE,
    )
    server = await gateway_server(config, timeout=60)
    base = base_url(server)
    supervisor: EngineSupervisor = server.app[SUPERVISOR]
    recorder = Recorder(supervisor)
    body = chat("asked of a dead engine", max_tokens=12)
    async with aiohttp.ClientSession() as session:
        await control_emulator(session, port, tokenize=500)
        killer = chat("no budget: the engine loop dies", max_tokens=None)
        killed = await send(session, config.engine.url + CHAT_PATH, killer, content_type=None)
        assert killed["status"] == 500  # /health answers 503 from now on
        assert supervisor.is_ready()  # not noticed yet
        result = await send(session, base + CHAT_PATH, body, 60)
        answer = await _answer(session, base, body)
    _check_whole(result, body, answer)
    assert supervisor.epoch == 2
    assert recorder.reasons(EngineState.FAILED), recorder.changes


async def test_a_tokenize_500_from_a_fine_engine_is_a_503(gateway_server: Any) -> None:
    """A /tokenize answering a bare 500 while the engine generates fine is settled (a probe
    generation answers): the request gets a 503 in the OpenAI envelope with Retry-After, not a
    502 or 500, the engine is not restarted, and once /tokenize answers the same request is
    answered."""
    port = free_port()
    config = gateway_config(
        f"http://127.0.0.1:{port}",
        engine=emulator_section(port, "--control", timings=TIMINGS, probe_interval_s=30),
        models=BY_ENGINE,
    )
    server = await gateway_server(config, timeout=60)
    base = base_url(server)
    supervisor: EngineSupervisor = server.app[SUPERVISOR]
    body = chat("asked while /tokenize fails", max_tokens=12)
    async with aiohttp.ClientSession() as session:
        await control_emulator(session, port, tokenize=500)
        refused = await send(session, base + CHAT_PATH, body, 60)
        await control_emulator(session, port, tokenize=200)
        answered = await send(session, base + CHAT_PATH, body, 60)
    assert refused["status"] == 503, refused
    error = error_envelope(refused["json"], 503)
    assert error["type"] == "ServiceUnavailableError"
    assert "HTTP 500" in error["message"]
    assert int(refused["headers"]["Retry-After"]) >= 1
    assert answered["status"] == 200, answered
    assert supervisor.is_ready()
    assert supervisor.epoch == 1


ROUNDS = 3


async def test_a_storm_of_innocents_with_one_poison_loses_none(gateway_server: Any) -> None:
    """The issue's storm, three times: 30 innocent chats (half streamed) sent 20 ms apart with
    one poison among them, every prompt counted through the engine's /tokenize; every innocent
    gets its whole answer and the poison ends quarantined."""
    port = free_port()
    flags = ("--die-on", POISON, "--tokens-per-second", "50")
    config = gateway_config(
        f"http://127.0.0.1:{port}",
        engine=emulator_section(port, *flags, timings=TIMINGS),
        models=BY_ENGINE,
        isolation={"probation_timeout_s": 20, "queue_timeout_s": 60, "queue_max": 512},
    )
    server = await gateway_server(config, timeout=60)
    base = base_url(server)
    supervisor: EngineSupervisor = server.app[SUPERVISOR]
    bodies: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as session:
        for round_ in range(ROUNDS):
            epoch = supervisor.epoch
            innocents = [
                chat(f"round {round_} innocent {i}", max_tokens=10, stream=i % 2 == 1)
                for i in range(30)
            ]
            poison = chat(f"round {round_} {POISON}", max_tokens=10)

            async def later(body: dict[str, Any], delay: float) -> dict[str, Any]:
                await asyncio.sleep(delay)
                return await send(session, base + CHAT_PATH, body, 120)

            sent = [later(body, 0.02 * i) for i, body in enumerate(innocents)]
            sent.insert(15, later(poison, 0.02 * 15 + 0.01))
            answers = await asyncio.gather(*sent)
            poisoned = answers.pop(15)
            assert poisoned["status"] in {422, 503}, poisoned
            assert supervisor.epoch > epoch or not supervisor.is_ready()  # it did kill it
            assert await supervisor.wait_ready(30)
            bodies += innocents
            results += answers
        for body, result in zip(bodies, results, strict=True):
            _check_whole(result, body, await _answer(session, base, body))
