"""One quarantine for every replica, through a real redis-server: two (or three) gateways, each
supervising its own emulator, sharing culprits and suspicion; Redis killed and restarted."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from gateway.config import parse_config
from gateway.fleet import Fleet
from gateway.isolation import FINGERPRINT_VERSION, Quarantine, SuspectBook, fingerprint
from gateway.keys import CONFIG, FLEET, GATE, INFLIGHT, SUPERVISOR
from tests.helpers import (
    CHAT_PATH,
    MODEL_DIR,
    Gateway,
    base_url,
    chat,
    emulator_argv,
    emulator_section,
    free_port,
    gateway_config,
    kill_leftovers,
    pid_alive,
    send,
    until,
)
from tests.redis_server import RedisServer

POISON = "POISON-5d1e"

TIMINGS: dict[str, Any] = {
    "probe_interval_s": 0.5,
    "startup_probe_interval_s": 0.1,
    "probe_timeout_s": 2,
    "health_failures": 2,
    "restart_backoff_s": 0.1,
    "restart_backoff_max_s": 0.5,
    "stop_grace_s": 2,
    "max_restarts": 10,
}
_prefixes = itertools.count()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own: free port, temp folder, no persistence."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own (one deployment)."""
    return f"test-{os.getpid()}-{next(_prefixes)}"


def _shared(redis: RedisServer, prefix: str, replica: str) -> dict[str, Any]:
    return {
        "url": redis.url,
        "key_prefix": prefix,
        "replica_id": replica,
        "connect_timeout_s": 1,
        "command_timeout_s": 1,
        "reconnect_s": 0.2,
        "health_check_s": 1,
    }


def _config(
    redis: RedisServer,
    prefix: str,
    replica: str,
    *flags: str,
    engine_url: str | None = None,
    **isolation: Any,
) -> Any:
    """A gateway supervising its own emulator (with `flags`), or in front of `engine_url`
    (the sidecar shape), sharing its quarantine as `replica`."""
    if engine_url is None:
        port = free_port()
        engine = emulator_section(port, "--tokenizer", str(MODEL_DIR), *flags, timings=TIMINGS)
        engine_url = engine["url"]
    else:
        engine = {**TIMINGS, "url": engine_url}
    return gateway_config(
        engine_url,
        engine=engine,
        admin={"enabled": True, "port": free_port()},
        models={"tiny": {"tokenizer": str(MODEL_DIR), "token_source": "local", "deadline_s": 60}},
        isolation={
            "probation_timeout_s": 20,
            "queue_timeout_s": 60,
            "shared": _shared(redis, prefix, replica),
            **isolation,
        },
    )


class Emulator:
    """An emulator the test runs itself (a sidecar engine), printing vLLM's access log to a
    file: which requests reached it."""

    def __init__(self, log_path: Path, *flags: str) -> None:
        self.port = free_port()
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*emulator_argv(self.port, "--log-requests", *flags)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def generations(self) -> int:
        """Generation requests that reached this engine."""
        return self.log_path.read_text().count(f'"POST {CHAT_PATH} HTTP/1.1"')

    async def ready(self) -> None:
        ok = await until(lambda: "emulator listening" in self.log_path.read_text(), 30)
        assert ok, self.log_path.read_text()

    def stop(self) -> None:
        if pid_alive(self.proc.pid):
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                kill_leftovers(self.proc.pid)
        self.proc.wait(timeout=10)


@pytest.fixture
async def sidecar_engine(tmp_path: Path) -> AsyncIterator[Emulator]:
    """Engine B: an emulator that dies on the poison too, should the poison ever reach it."""
    engine = Emulator(tmp_path / "engine-b.log", "--die-on", POISON)
    try:
        await engine.ready()
        yield engine
    finally:
        engine.stop()


def _fp(server: Gateway, body: dict[str, Any]) -> str:
    return fingerprint(body, server.app[CONFIG].current.isolation.fingerprint_ignore_set)


def _knows(server: Gateway, fp: str) -> bool:
    gate = server.app[GATE]
    return gate.quarantine.get(fp, gate.wall_clock()) is not None


async def _chat(base: str, body: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        return await send(session, base + CHAT_PATH, body, timeout)


async def _quarantine_on(server: Gateway, poison: dict[str, Any]) -> None:
    """Send `poison` until its gateway's probation proves it a culprit (the engine dies)."""
    fp = _fp(server, poison)
    for _ in range(3):
        result = await _chat(base_url(server), poison)
        assert result["status"] in {422, 503}, result
        if _knows(server, fp):
            break
    entry = server.app[GATE].quarantine.get(fp, time.time())
    assert entry is not None
    assert entry.proven


def _admin(server: Gateway, path: str) -> str:
    """A URL on the gateway's own admin listener."""
    assert server.admin_url is not None
    return server.admin_url + path


async def test_a_culprit_found_on_one_replica_is_refused_by_another_before_its_engine_sees_it(
    redis_server: RedisServer, gateway_server: Any, prefix: str, sidecar_engine: Emulator
) -> None:
    """The poison kills engine A through gateway A and is quarantined; gateway B then refuses
    it at once (422, who found it and why) and engine B's request log never shows it."""
    a = await gateway_server(_config(redis_server, prefix, "a", "--die-on", POISON), timeout=60)
    b = await gateway_server(
        _config(redis_server, prefix, "b", engine_url=sidecar_engine.url), timeout=60
    )
    assert a.app[FLEET].connected
    assert b.app[FLEET].connected
    innocent = await _chat(base_url(b), chat("an innocent question"))
    assert innocent["status"] == 200
    assert sidecar_engine.generations() == 1

    poison = chat(f"please {POISON} now", max_tokens=8)
    fp = _fp(a, poison)
    await _quarantine_on(a, poison)
    found = a.app[GATE].quarantine.get(fp, time.time())
    assert found is not None
    assert await until(lambda: _knows(b, fp), 10)
    lag_ms = (time.time() - found.since) * 1000

    refused = await _chat(base_url(b), {**poison, "user": "another-client", "stream": True})
    assert refused["status"] == 422, refused
    assert refused["json"]["error"]["type"] == "QuarantinedRequestError"
    assert sidecar_engine.generations() == 1  # engine B never saw the poison
    assert pid_alive(sidecar_engine.proc.pid)
    entry = b.app[GATE].quarantine.get(fp, time.time())
    assert entry is not None
    assert entry.found_by == "a"
    assert "probation" in entry.reason
    assert entry.until == found.until
    # Redis holds it with a TTL (expiry is Redis's), under the fingerprint's version.
    async with Redis.from_url(redis_server.url) as r:
        ttl_ms = await r.pttl(f"{prefix}:v{FINGERPRINT_VERSION}:quarantine:{fp}")
    assert 0 < ttl_ms <= a.app[CONFIG].current.isolation.quarantine_ttl_s * 1000
    print(f"quarantine on A -> known on B (upper bound, polled): {lag_ms:.0f} ms")


async def test_a_replica_started_after_the_quarantine_already_knows_it(
    redis_server: RedisServer, gateway_server: Any, prefix: str, sidecar_engine: Emulator
) -> None:
    """A gateway that starts after a culprit was quarantined elsewhere refuses it from its
    first request, and its engine never sees it."""
    a = await gateway_server(_config(redis_server, prefix, "a", "--die-on", POISON), timeout=60)
    poison = chat(f"a {POISON} again", max_tokens=8)
    await _quarantine_on(a, poison)
    assert await until(lambda: a.app[FLEET].unsent == 0, 10)

    late = await gateway_server(
        _config(redis_server, prefix, "late", engine_url=sidecar_engine.url), timeout=60
    )
    assert _knows(late, _fp(a, poison))
    refused = await _chat(base_url(late), poison)
    assert refused["status"] == 422
    assert sidecar_engine.generations() == 0


async def test_clearing_on_one_replica_clears_everywhere(
    redis_server: RedisServer, gateway_server: Any, prefix: str, sidecar_engine: Emulator
) -> None:
    """Two culprits found on A are known on B; B's admin listener clears one (gone from A and
    from Redis, the other kept), then A's clears all (gone from B)."""
    a = await gateway_server(_config(redis_server, prefix, "a", "--die-on", POISON), timeout=60)
    b = await gateway_server(
        _config(redis_server, prefix, "b", engine_url=sidecar_engine.url), timeout=60
    )
    first, second = chat(f"{POISON} one", max_tokens=8), chat(f"{POISON} two", max_tokens=8)
    await _quarantine_on(a, first)
    await _quarantine_on(a, second)
    fp1, fp2 = _fp(a, first), _fp(a, second)
    assert await until(lambda: _knows(b, fp1) and _knows(b, fp2), 10)

    async with aiohttp.ClientSession() as session:
        async with session.delete(_admin(b, f"/quarantine/{fp1}")) as resp:
            assert resp.status == 200
        assert await until(lambda: not _knows(a, fp1), 10)
        assert _knows(a, fp2)
        assert _knows(b, fp2)
        async with Redis.from_url(redis_server.url, decode_responses=True) as r:
            index = f"{prefix}:v{FINGERPRINT_VERSION}:quarantine"
            assert await r.zrange(index, 0, -1) == [fp2]
        async with session.delete(_admin(a, "/quarantine")) as resp:
            assert (await resp.json())["cleared"] == 1
        assert await until(lambda: not _knows(b, fp2), 10)
        async with session.get(_admin(b, "/quarantine")) as resp:
            assert (await resp.json())["quarantine"] == []
    assert sidecar_engine.generations() == 0


async def _kill_engine_with_in_flight(server: Gateway, body: dict[str, Any]) -> None:
    """Send `body` (slow), and SIGKILL the engine while it is in flight (an unrelated death:
    an out-of-memory kill): the request is a suspect, retried alone, and answered."""
    request = asyncio.create_task(_chat(base_url(server), body, timeout=90))
    assert await until(lambda: len(server.app[INFLIGHT]) == 1, 10)
    pid = server.app[SUPERVISOR].pid
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)  # the engine's whole process group, as the OOM killer might
    result = await request
    assert result["status"] == 200, result


async def test_suspicion_is_counted_across_the_fleet_and_makes_a_suspect_not_a_culprit(
    redis_server: RedisServer, gateway_server: Any, prefix: str
) -> None:
    """A request in flight at one engine death on A and one on B (unrelated deaths) reaches
    `suspect_failures` fleet-wide: every replica holds it as a suspect (it runs alone next),
    none quarantines it, and its next run alone acquits it."""
    flags = ("--tokens-per-second", "20")
    a = await gateway_server(_config(redis_server, prefix, "a", *flags), timeout=60)
    b = await gateway_server(_config(redis_server, prefix, "b", *flags), timeout=60)
    popular = chat("a popular question", max_tokens=30)
    fp = _fp(a, popular)
    counter = f"{prefix}:v{FINGERPRINT_VERSION}:suspicion:{fp}"

    await _kill_engine_with_in_flight(a, popular)
    async with Redis.from_url(redis_server.url, decode_responses=True) as r:
        assert await until(lambda: a.app[FLEET].unsent == 0, 10)
        assert await r.get(counter) == "1"
        assert not a.app[GATE].suspects.is_suspect(fp, time.time())  # acquitted alone on A
        assert not b.app[GATE].suspects.is_suspect(fp, time.time())

        await _kill_engine_with_in_flight(b, popular)
        assert await until(lambda: a.app[GATE].suspects.is_suspect(fp, time.time()), 10)
        assert await r.get(counter) == "2"
        assert await r.pttl(counter) > 0
        assert await r.zrange(f"{prefix}:v{FINGERPRINT_VERSION}:quarantine", 0, -1) == []
    assert not _knows(a, fp)
    assert not _knows(b, fp)

    answered = await _chat(base_url(a), popular)  # alone on probation, then acquitted
    assert answered["status"] == 200
    assert not a.app[GATE].suspects.is_suspect(fp, time.time())
    assert not _knows(a, fp)


async def test_redis_killed_and_restarted(
    redis_server: RedisServer, gateway_server: Any, prefix: str, sidecar_engine: Emulator
) -> None:
    """Redis dies: both gateways keep serving, say so once in their log and in /ready's body
    (not its status); a culprit found meanwhile on A is sent when Redis is back (empty, as a
    restarted Redis without persistence is), and B then refuses it."""
    a = await gateway_server(_config(redis_server, prefix, "a", "--die-on", POISON), timeout=60)
    b = await gateway_server(
        _config(redis_server, prefix, "b", engine_url=sidecar_engine.url), timeout=60
    )
    with capture_logs() as logs:
        redis_server.kill()
        assert await until(lambda: not a.app[FLEET].connected and not b.app[FLEET].connected, 10)
        async with aiohttp.ClientSession() as session, session.get(base_url(a) + "/ready") as resp:
            assert resp.status == 200
            body = await resp.json()
        assert body["fleet"]["redis"] == "unreachable"
        served = await _chat(base_url(b), chat("served while Redis is down"))
        assert served["status"] == 200

        poison = chat(f"{POISON} while Redis is down", max_tokens=8)
        fp = _fp(a, poison)
        await _quarantine_on(a, poison)  # locally: A's own quarantine still works
        assert a.app[FLEET].unsent >= 1
        assert not _knows(b, fp)
        await asyncio.sleep(1.0)  # several reconnect attempts fail meanwhile

        redis_server.start()
        assert await until(lambda: a.app[FLEET].connected and b.app[FLEET].connected, 15)
        assert await until(lambda: _knows(b, fp), 10)
    unreachable = [e for e in logs if e["event"] == "fleet_redis_unreachable"]
    assert sorted(e["replica"] for e in unreachable) == ["a", "b"]  # once each
    assert any(e["event"] == "fleet_redis_back" for e in logs)

    refused = await _chat(base_url(b), poison)
    assert refused["status"] == 422
    assert sidecar_engine.generations() == 1
    async with aiohttp.ClientSession() as session, session.get(base_url(b) + "/ready") as resp:
        assert (await resp.json())["fleet"]["redis"] == "connected"


def _fleet(redis: RedisServer, prefix: str, replica: str, **isolation: Any) -> Fleet:
    config = parse_config(
        {"isolation": {"shared": _shared(redis, prefix, replica), **isolation}}
    ).isolation
    assert config.shared is not None
    quarantine = Quarantine(config.quarantine_ttl_s, config.quarantine_max_entries)
    suspects = SuspectBook(config.quarantine_ttl_s, config.quarantine_max_entries)
    return Fleet(config.shared, config, quarantine, suspects)


async def test_the_bound_on_entries_holds_across_the_fleet(
    redis_server: RedisServer, prefix: str
) -> None:
    """With a bound of 3, two culprits found on each of two replicas leave 3 in the fleet:
    the oldest is dropped everywhere, in Redis too."""
    a = _fleet(redis_server, prefix, "a", quarantine_max_entries=3)
    b = _fleet(redis_server, prefix, "b", quarantine_max_entries=3)
    await a.start()
    await b.start()
    try:
        now = time.time()
        for i, fleet in enumerate((a, a, b, b)):
            fleet.quarantine.add(f"fp{i}", "tiny", "alone on probation", 1, now + i, proven=True)
            assert await until(lambda: a.unsent == 0 and b.unsent == 0, 10)

        def fps(fleet: Fleet) -> set[str]:
            return {e.fingerprint for e in fleet.quarantine.entries(time.time())}

        assert await until(lambda: fps(a) == fps(b) == {"fp1", "fp2", "fp3"}, 10)
        async with Redis.from_url(redis_server.url, decode_responses=True) as r:
            index = f"{prefix}:v{FINGERPRINT_VERSION}:quarantine"
            assert sorted(await r.zrange(index, 0, -1)) == ["fp1", "fp2", "fp3"]
            assert await r.exists(f"{prefix}:v{FINGERPRINT_VERSION}:quarantine:fp0") == 0
    finally:
        await a.stop()
        await b.stop()


async def test_an_entry_found_by_count_alone_stays_on_its_replica(
    redis_server: RedisServer, prefix: str
) -> None:
    """A fingerprint quarantined for being in flight at `suspect_failures` deaths (not proven
    alone on probation) is not shared; a proven one is."""
    a = _fleet(redis_server, prefix, "a")
    b = _fleet(redis_server, prefix, "b")
    await a.start()
    await b.start()
    try:
        now = time.time()
        a.quarantine.add("counted", None, "in flight at 2 engine failures", 2, now)
        a.quarantine.add("proven", None, "alone on probation", 1, now, proven=True)
        assert await until(lambda: b.quarantine.get("proven", time.time()) is not None, 10)
        assert b.quarantine.get("counted", time.time()) is None
    finally:
        await a.stop()
        await b.stop()


async def test_a_gateway_starts_and_serves_without_redis(gateway_server: Any) -> None:
    """With Redis unreachable from the start, the gateway starts, serves, and says so in
    /ready's body only."""
    nothing = RedisServer(Path("/nonexistent"))  # never started: its port refuses
    server = await gateway_server(_config(nothing, "none", "alone"), timeout=60)
    assert not server.app[FLEET].connected
    served = await _chat(base_url(server), chat("hello"))
    assert served["status"] == 200
    async with aiohttp.ClientSession() as session, session.get(base_url(server) + "/ready") as r:
        assert r.status == 200
        assert (await r.json())["fleet"]["redis"] == "unreachable"


async def test_a_change_redis_refuses_is_dropped_and_sharing_goes_on(
    redis_server: RedisServer, prefix: str
) -> None:
    """A change Redis refuses (here: someone else wrote a suspicion key that is no counter) is
    logged and dropped, not retried forever; the replica stays connected and shares the next."""
    base = f"{prefix}:v{FINGERPRINT_VERSION}"
    async with Redis.from_url(redis_server.url) as r:
        await r.set(f"{base}:suspicion:y", "not a counter")
    a = _fleet(redis_server, prefix, "a")
    b = _fleet(redis_server, prefix, "b")
    await a.start()
    await b.start()
    try:
        with capture_logs() as logs:
            a.charged("y", None)
            assert await until(lambda: a.unsent == 0, 10)
        assert [e["event"] for e in logs if e["log_level"] == "error"] == ["fleet_change_refused"]
        assert a.connected
        a.quarantine.add("x", None, "alone on probation", 1, time.time(), proven=True)
        assert await until(lambda: b.quarantine.get("x", time.time()) is not None, 10)
    finally:
        await a.stop()
        await b.stop()
