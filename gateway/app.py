"""`create_app(config)`: the one place where the gateway is wired together."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import aiohttp
import structlog
from aiohttp import web

from engine.state import EngineState, StateChange
from engine.supervisor import EngineSupervisor
from gateway import handlers
from gateway.admin import create_admin_app
from gateway.admission import Gate
from gateway.aliases import AliasReporter
from gateway.config import KSERVE_PREFIX, Config, ConfigHolder, MetricsListener
from gateway.edge import api_key_hashes, engine_key
from gateway.engine_wire import EngineWire
from gateway.engineview import EngineHistory
from gateway.fleet import Fleet
from gateway.inflight import InflightLedger
from gateway.keys import (
    ADMIN_APP,
    API_KEYS,
    CONFIG,
    CONFIG_PATH,
    ENGINE_HISTORY,
    FLEET,
    GATE,
    INFLIGHT,
    LIFECYCLE,
    METRICS,
    RELOADER,
    SESSION,
    SUPERVISOR,
    TOKENS,
    UPSTREAM,
    VOCABULARIES,
    WIRE,
)
from gateway.lifecycle import Lifecycle
from gateway.logs import configure_logging
from gateway.metrics import Metrics, metrics_handler
from gateway.middlewares import expect_handler, guard_middleware
from gateway.proxy import Upstream
from gateway.reload import Reloader
from gateway.snapshot import Snapshot, load_snapshot, prepare_snapshot
from gateway.tokens import TokenCounters
from gateway.vocab import Vocabularies

log = structlog.get_logger("gateway")

VERSION_TIMEOUT_S = 10.0


def create_app(config: Config, *, config_path: str | Path | None = None) -> web.Application:
    """The gateway. With `config_path` (the file `config` was loaded from) it reloads that
    file live: when it changes, on SIGHUP, and on the admin listener's POST /reload.
    Raises ConfigError when the admin listener would be off loopback without a token."""
    app = web.Application(
        middlewares=[guard_middleware], client_max_size=config.server.max_body_bytes
    )
    app[CONFIG] = ConfigHolder(config)
    app[API_KEYS] = api_key_hashes(config.server.api_key_env, os.environ)
    app[INFLIGHT] = InflightLedger()
    app[LIFECYCLE] = Lifecycle()
    if config_path is not None:
        app[CONFIG_PATH] = str(config_path)
    metrics_routes = _metrics(app, config) if config.metrics.enabled else []
    on_admin = config.metrics.listener is MetricsListener.ADMIN
    if config.admin.enabled:
        app[ADMIN_APP] = create_admin_app(
            app, config.admin, extra_routes=metrics_routes if on_admin else ()
        )
    if not on_admin:
        app.router.add_routes(metrics_routes)
    # Resources with a lifetime; torn down in reverse order (the engine stops before the
    # session that talks to it is closed; the watcher stops before the engine).
    app.cleanup_ctx.append(_upstream_ctx)
    app.cleanup_ctx.append(_engine_ctx)
    app.cleanup_ctx.append(_reload_ctx)
    if config.isolation.shared is not None:
        app.cleanup_ctx.append(_fleet_ctx)  # after the gate it shares; stopped before it

    app.router.add_get("/health", handlers.health)
    app.router.add_get("/ready", handlers.ready)
    app.router.add_get("/engine/live", handlers.engine_live)
    for path, handler in handlers.GENERATION_HANDLERS.items():
        app.router.add_post(path, handler, expect_handler=expect_handler)
        app.router.add_post(KSERVE_PREFIX + path, handler, expect_handler=expect_handler)
    app.router.add_route("*", "/{tail:.*}", handlers.relay, expect_handler=expect_handler)
    return app


def _metrics(app: web.Application, config: Config) -> list[web.RouteDef]:
    """The app's registry; the routes of GET /metrics and GET /engine/metrics."""
    holder = app[CONFIG]
    nothing_served: Mapping[str, int] = {}

    def models() -> tuple[Config, Mapping[str, int]]:
        supervisor = app.get(SUPERVISOR)
        return holder.current, (nothing_served if supervisor is None else supervisor.models)

    metrics = Metrics(models)
    app[METRICS] = metrics
    return [
        web.get("/metrics", metrics_handler(metrics)),
        web.get("/engine/metrics", handlers.engine_metrics),
    ]


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG].current
    engine = config.engine
    key = engine_key(config.server.api_key_env, os.environ)
    # The gateway's own requests carry the engine's key; a client's own Authorization,
    # forwarded, takes its place on relayed ones.
    auth = None if key is None else {"Authorization": f"Bearer {key}"}
    # Generation and the relayed routes: the gateway's own HTTP/1.1 client (no read timeout
    # either; the engine's bytes relayed as they come, never decoded).
    app[WIRE] = EngineWire(engine.url, connect_timeout_s=engine.connect_timeout_s, headers=auth)
    session = aiohttp.ClientSession(
        headers=auth,
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
        # No total or read timeout: a healthy long generation can be silent for minutes;
        # a stuck engine is the supervisor's to notice. Connecting is bounded.
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=engine.connect_timeout_s),
        # Bytes are relayed as the engine sent them, never re-encoded.
        auto_decompress=False,
        skip_auto_headers=("Accept-Encoding", "User-Agent"),
    )
    app[SESSION] = session
    yield
    await app[WIRE].close()
    await session.close()


async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    holder = app[CONFIG]
    config = holder.current
    supervisor = EngineSupervisor(config.engine, app[SESSION], progress=app[INFLIGHT])
    upstream = Upstream(app[SESSION], app[WIRE], config.engine.url, supervisor.retry_after_s)
    app[SUPERVISOR] = supervisor
    AliasReporter(app[CONFIG], supervisor)
    app[UPSTREAM] = upstream
    gate = Gate(config.isolation, supervisor, app[INFLIGHT], config.engine)
    gate.bulkhead = lambda model: holder.current.policy_for(model).max_in_flight
    app[GATE] = gate
    if METRICS in app:
        app[METRICS].state.gate = gate
        app[METRICS].state.engine_state = lambda: supervisor.state
        supervisor.subscribe(app[METRICS].engine_changed)
    tokens = TokenCounters(upstream, threads=config.server.count_threads)
    # The starting snapshot's counters are made ahead, off the event loop, like a reload's;
    # a file it names that cannot be read stops the start (ConfigError) before any listener.
    snapshot = await asyncio.to_thread(prepare_snapshot, config, tokens)
    for warning in snapshot.warnings:
        log.warning("config_warning", warning=warning)
    tokens.adopt(snapshot.counters)
    app[TOKENS] = tokens
    app[VOCABULARIES] = Vocabularies()
    supervisor.subscribe(app[VOCABULARIES].on_state_change)  # read anew once ready again

    async def ask_version() -> object:
        return (await upstream.json("GET", "/version", timeout=VERSION_TIMEOUT_S))[1]

    history = EngineHistory(ask_version)
    app[ENGINE_HISTORY] = history
    supervisor.subscribe(history)  # before start: the first change is kept
    await supervisor.start()
    yield
    await supervisor.stop()
    await history.close()
    await tokens.close()


async def _reload_ctx(app: web.Application) -> AsyncIterator[None]:
    """Watch config.yaml (when the app was made from one) and apply what validates."""
    if CONFIG_PATH not in app:
        yield
        return
    path = Path(app[CONFIG_PATH])
    supervisor, tokens = app[SUPERVISOR], app[TOKENS]

    def prepare(file: Path) -> Snapshot:
        # In a worker thread: `models` is an immutable mapping the supervisor replaces whole.
        return load_snapshot(file, tokens, supervisor.models)

    def apply(running: Config, new: Config, snapshot: Snapshot) -> None:
        # One synchronous step: no request runs between the first change and the swap.
        tokens.adopt(snapshot.counters)
        app[GATE].reconfigure(new.isolation, new.engine)
        supervisor.reconfigure(new.engine)
        if new.logging != running.logging:
            configure_logging(new.logging)
        app[CONFIG].swap(new)

    reloader = Reloader(path, app[CONFIG], prepare, apply)
    app[RELOADER] = reloader
    if METRICS in app:
        app[METRICS].state.reloads = reloader.state

    def on_engine(change: StateChange) -> None:
        # A (re)spawned engine runs the command of the snapshot serving then.
        if change.new is EngineState.FAILED:
            reloader.state.pending_engine_restart = ()

    supervisor.subscribe(on_engine)
    async with reloader.running():
        yield


async def _fleet_ctx(app: web.Application) -> AsyncIterator[None]:
    """One quarantine for every replica (`isolation.shared`): the gate's quarantine and suspect
    book mirrored through Redis."""
    isolation = app[CONFIG].current.isolation
    assert isolation.shared is not None  # only added when set
    gate = app[GATE]
    fleet = Fleet(
        isolation.shared, isolation, gate.quarantine, gate.suspects, wall_clock=gate.wall_clock
    )
    app[FLEET] = fleet
    if METRICS in app:
        app[METRICS].watch_shared_store(lambda: fleet.connected)
    await fleet.start()
    yield
    await fleet.stop()
