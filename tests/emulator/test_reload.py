"""Live reload over real sockets: the gateway in front of the emulator, its config.yaml edited
while requests flow (admin POST /reload, the file watcher, a ConfigMap-style symlink swap)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import structlog
import yaml
from aiohttp.test_utils import TestServer

from engine.emulator import EmulatorSettings, create_emulator_app
from gateway.app import create_app
from gateway.config import load_config
from gateway.keys import ADMIN_APP, GATE, INFLIGHT, RELOADER, SUPERVISOR
from gateway.policy import HEADER_MAX_TOKENS
from gateway.reload import Outcome
from tests.helpers import (
    CHAT_PATH,
    MODEL_DIR,
    base_url,
    chat,
    configmap_swap,
    free_port,
    run_fake_upstream,
    send,
    until,
)


def config_data(engine_url: str, limit: int, **policy: Any) -> dict[str, Any]:
    """A sidecar gateway in front of `engine_url` whose tiny model clamps output to `limit`."""
    return {
        "server": {"host": "127.0.0.1", "port": 0},
        "admin": {"enabled": True, "host": "127.0.0.1", "port": 0},
        "engine": {
            "url": engine_url,
            "probe_interval_s": 0.5,
            "startup_probe_interval_s": 0.1,
            "probe_timeout_s": 5,
        },
        "models": {
            "tiny": {
                "tokenizer": str(MODEL_DIR),
                "token_source": "local",
                "max_tokens_limit": limit,
                **policy,
            }
        },
        "isolation": {"queue_timeout_s": 60, "queue_max": 512},
        "logging": {"format": "json"},
    }


def write_renamed(path: Path, data: dict[str, Any] | str) -> None:
    """Save as an editor does: a new file renamed over the old one."""
    text = data if isinstance(data, str) else yaml.safe_dump(data)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@asynccontextmanager
async def emulator(**settings: Any) -> AsyncIterator[str]:
    server = await run_fake_upstream(
        create_emulator_app(EmulatorSettings(tokenizer=MODEL_DIR, **settings))
    )
    try:
        yield base_url(server)
    finally:
        await server.close()


@asynccontextmanager
async def gateway(path: Path) -> AsyncIterator[tuple[TestServer, str, str]]:
    """The gateway made from the file at `path` (and watching it): the server, its base URL
    and its admin listener's."""
    app = create_app(load_config(path), config_path=path)
    server = TestServer(app, host="127.0.0.1", port=free_port(), handler_cancellation=True)
    await server.start_server()
    admin = TestServer(app[ADMIN_APP], host="127.0.0.1", port=free_port())
    await admin.start_server()
    try:
        assert await app[SUPERVISOR].wait_ready(30)
        yield server, base_url(server), base_url(admin)
    finally:
        await admin.close()
        await server.close()


def clamped_to(result: dict[str, Any]) -> int:
    """The output limit the gateway gave a request asking for 1000 tokens."""
    header = result["headers"][HEADER_MAX_TOKENS]
    assert header.startswith("clamped 1000->"), header
    return int(header.rsplit(">", 1)[1])


async def test_reloads_under_load_lose_nothing_and_apply_in_order(tmp_path: Path) -> None:
    """25 reloads while 4 clients send without pause: every request is answered 200, each new
    limit applies to the request sent after its reload, and a request finishes with the
    limit it was admitted under (its output is exactly that long)."""
    async with emulator(tokens_per_second=400) as engine_url:
        path = tmp_path / "config.yaml"
        write_renamed(path, config_data(engine_url, 20))
        async with gateway(path) as (server, base, admin):
            stop = asyncio.Event()
            seen: list[tuple[int, int, int]] = []  # status, limit, completion tokens

            async def client(session: aiohttp.ClientSession, n: int) -> None:
                i = 0
                while not stop.is_set() and i < 2000:
                    i += 1
                    result = await send(
                        session, base + CHAT_PATH, chat(f"c{n}-{i}", max_tokens=1000)
                    )
                    tokens = result["json"]["usage"]["completion_tokens"]
                    seen.append((result["status"], clamped_to(result), tokens))

            limits = [20]
            async with aiohttp.ClientSession() as session:
                clients = [asyncio.create_task(client(session, n)) for n in range(4)]
                async with asyncio.timeout(180):
                    for i in range(1, 26):
                        limit = 20 + i
                        write_renamed(path, config_data(engine_url, limit))
                        async with session.post(admin + "/reload") as resp:
                            assert resp.status == 200
                            result = await resp.json()
                        assert result["outcome"] == "applied"
                        limits.append(limit)
                        after = await send(
                            session, base + CHAT_PATH, chat(f"after {i}", max_tokens=1000)
                        )
                        assert after["status"] == 200
                        assert clamped_to(after) == limit
                        assert after["json"]["usage"]["completion_tokens"] == limit
                    stop.set()
                    await asyncio.gather(*clients)
            state = server.app[RELOADER].state
            assert state.generation >= 26
            assert state.failures == 0
            assert len(server.app[INFLIGHT]) == 0
    assert len(seen) >= 25
    assert all(status == 200 for status, _, _ in seen)
    assert all(limit in limits and tokens == limit for _, limit, tokens in seen), seen


async def test_a_configmap_swap_is_picked_up(tmp_path: Path) -> None:
    """A Kubernetes ConfigMap update (a new timestamped folder, `..data` swapped to it,
    config.yaml a link through it) is noticed without a signal and applied."""
    async with emulator() as engine_url:
        link = configmap_swap(tmp_path, yaml.safe_dump(config_data(engine_url, 20)), "v1")
        async with gateway(link) as (server, base, _), aiohttp.ClientSession() as session:
            assert (
                clamped_to(await send(session, base + CHAT_PATH, chat("a", max_tokens=1000))) == 20
            )
            configmap_swap(tmp_path, yaml.safe_dump(config_data(engine_url, 33)), "v2")
            state = server.app[RELOADER].state
            assert await until(lambda: state.generation == 2, 10)
            assert state.last is not None
            assert state.last.trigger == "file"
            result = await send(session, base + CHAT_PATH, chat("b", max_tokens=1000))
            assert clamped_to(result) == 33


async def test_an_editor_save_is_picked_up(tmp_path: Path) -> None:
    """Write-then-rename of config.yaml is noticed by the watcher and applied."""
    async with emulator() as engine_url:
        path = tmp_path / "config.yaml"
        write_renamed(path, config_data(engine_url, 20))
        async with gateway(path) as (server, base, _):
            write_renamed(path, config_data(engine_url, 25))
            state = server.app[RELOADER].state
            assert await until(lambda: state.generation == 2, 10)
            async with aiohttp.ClientSession() as session:
                result = await send(session, base + CHAT_PATH, chat("b", max_tokens=1000))
            assert clamped_to(result) == 25


INVALID: list[tuple[Callable[[str], dict[str, Any] | str], str]] = [
    (lambda url: {**config_data(url, 20), "modles": {}}, "modles (line "),
    (lambda url: config_data(url, -3), "models.tiny.max_tokens_limit (line "),
    (
        lambda url: config_data(url, 20, tokenizer="/nonexistent/tokenizer"),
        "models.tiny.tokenizer (line ",
    ),
    (lambda url: "models: [unclosed\n", "not valid YAML"),
]


async def test_an_invalid_file_keeps_the_running_policy(tmp_path: Path) -> None:
    """Each invalid file (unknown key, bad value, a tokenizer path that does not exist, broken
    YAML) leaves the old policy serving, is logged with its key and line and counted; the
    next valid file still applies."""
    async with emulator() as engine_url:
        path = tmp_path / "config.yaml"
        write_renamed(path, config_data(engine_url, 20))
        async with gateway(path) as (server, base, admin):
            state = server.app[RELOADER].state
            async with aiohttp.ClientSession() as session:
                for n, (make, fragment) in enumerate(INVALID, start=1):
                    write_renamed(path, make(engine_url))
                    with structlog.testing.capture_logs() as logs:
                        async with session.post(admin + "/reload") as resp:
                            assert resp.status == 422
                            result = await resp.json()
                    assert result["outcome"] == "invalid"
                    assert fragment in result["error"]
                    failed = [e for e in logs if e["event"] == "config_reload_failed"]
                    assert failed
                    assert fragment in failed[0]["error"]
                    assert state.failures >= n
                    assert state.last is not None
                    assert state.last.outcome is Outcome.INVALID
                    assert state.generation == 1
                    served = await send(session, base + CHAT_PATH, chat(f"x{n}", max_tokens=1000))
                    assert served["status"] == 200
                    assert clamped_to(served) == 20
                write_renamed(path, config_data(engine_url, 30))
                async with session.post(admin + "/reload") as resp:
                    assert (await resp.json())["outcome"] == "applied"
                served = await send(session, base + CHAT_PATH, chat("y", max_tokens=1000))
                assert clamped_to(served) == 30


async def test_what_changes_live(tmp_path: Path) -> None:
    """Models added and removed, relay paths, isolation settings apply at once; a new port is
    kept and named as waiting for a restart; the rest of that file still applies."""
    async with emulator(served_model_names=("tiny", "other")) as engine_url:
        path = tmp_path / "config.yaml"
        write_renamed(path, config_data(engine_url, 20))
        async with gateway(path) as (server, base, admin):
            data = config_data(engine_url, 20)
            data["models"]["other"] = {"token_source": "engine", "max_tokens_limit": 9}
            data["server"] = {**data["server"], "port": 1234, "relay_paths": ["GET /version"]}
            data["isolation"] = {**data["isolation"], "queue_max": 3}
            write_renamed(path, data)
            async with aiohttp.ClientSession() as session:
                async with session.post(admin + "/reload") as resp:
                    result = await resp.json()
                assert result["needs_gateway_restart"] == ["server.port"]
                other = {**chat("o", max_tokens=1000), "model": "other"}
                assert clamped_to(await send(session, base + CHAT_PATH, other)) == 9
                async with session.get(base + "/v1/models") as resp:
                    assert resp.status == 404
                async with session.get(base + "/version") as resp:
                    assert resp.status == 200
                assert server.app[GATE].config.queue_max == 3
                async with session.get(admin + "/config") as resp:
                    view = await resp.json()
                assert view["generation"] == 2
                assert view["effective"]["server"]["port"]["value"] == 0  # still the running one
                del data["models"]["other"]
                write_renamed(path, data)
                async with session.post(admin + "/reload") as resp:
                    assert (await resp.json())["outcome"] == "applied"
                # A model the file no longer names is back on the defaults (no limit of 9).
                assert clamped_to(await send(session, base + CHAT_PATH, other)) > 9


async def test_a_smaller_bulkhead_admits_no_more_until_under_it(tmp_path: Path) -> None:
    """max_in_flight 2 → 1 while 2 slow requests run and 2 more wait for them: the running
    ones finish, and from the moment fewer than 2 are in flight the waiting ones (admitted
    under the old size) go one at a time."""
    async with emulator(tokens_per_second=20) as engine_url:
        path = tmp_path / "config.yaml"
        write_renamed(path, config_data(engine_url, 100, max_in_flight=2))
        async with gateway(path) as (server, base, admin):
            ledger = server.app[INFLIGHT]
            samples: list[int] = []

            async def sample() -> None:
                while True:
                    samples.append(len(ledger))
                    await asyncio.sleep(0.02)

            async with aiohttp.ClientSession() as session:

                async def one(name: str, tokens: int) -> int:
                    result = await send(session, base + CHAT_PATH, chat(name, max_tokens=tokens))
                    return int(result["status"])

                slow = [asyncio.create_task(one(f"slow{i}", 60)) for i in range(2)]
                assert await until(lambda: len(ledger) == 2, 10)
                waiting = [asyncio.create_task(one(f"wait{i}", 20)) for i in range(2)]
                assert await until(lambda: server.app[GATE]._waiting == 2, 10)
                write_renamed(path, config_data(engine_url, 100, max_in_flight=1))
                async with session.post(admin + "/reload") as resp:
                    assert (await resp.json())["outcome"] == "applied"
                sampler = asyncio.create_task(sample())
                async with asyncio.timeout(60):
                    statuses = await asyncio.gather(*slow, *waiting)
                sampler.cancel()
    assert statuses == [200] * 4
    under = next(i for i, n in enumerate(samples) if n < 2)
    assert max(samples[under:]) <= 1, samples
    assert 1 in samples[under:]
