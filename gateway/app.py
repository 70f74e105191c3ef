"""`create_app(config)`: the one place where the gateway is wired together."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from engine.supervisor import EngineSupervisor
from gateway import handlers
from gateway.admin import create_admin_app
from gateway.admission import Gate
from gateway.config import KSERVE_PREFIX, Config, ConfigHolder
from gateway.fleet import Fleet
from gateway.inflight import InflightLedger
from gateway.keys import (
    ADMIN_APP,
    CONFIG,
    FLEET,
    GATE,
    INFLIGHT,
    LIFECYCLE,
    SESSION,
    SUPERVISOR,
    TOKENS,
    UPSTREAM,
)
from gateway.lifecycle import Lifecycle
from gateway.middlewares import guard_middleware
from gateway.proxy import Upstream
from gateway.tokens import TokenCounters


def create_app(config: Config) -> web.Application:
    app = web.Application(
        middlewares=[guard_middleware], client_max_size=config.server.max_body_bytes
    )
    app[CONFIG] = ConfigHolder(config)
    app[INFLIGHT] = InflightLedger()
    app[LIFECYCLE] = Lifecycle()
    if config.admin.enabled:
        app[ADMIN_APP] = create_admin_app(app)
    # Resources with a lifetime; torn down in reverse order (the engine stops before the
    # session that talks to it is closed).
    app.cleanup_ctx.append(_upstream_ctx)
    app.cleanup_ctx.append(_engine_ctx)
    if config.isolation.shared is not None:
        app.cleanup_ctx.append(_fleet_ctx)  # after the gate it shares; stopped before it

    app.router.add_get("/health", handlers.health)
    app.router.add_get("/ready", handlers.ready)
    app.router.add_get("/engine/live", handlers.engine_live)
    for path, handler in handlers.GENERATION_HANDLERS.items():
        app.router.add_post(path, handler)
        app.router.add_post(KSERVE_PREFIX + path, handler)
    app.router.add_route("*", "/{tail:.*}", handlers.relay)
    return app


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    engine = app[CONFIG].current.engine
    session = aiohttp.ClientSession(
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
    await session.close()


async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG].current
    supervisor = EngineSupervisor(config.engine, app[SESSION], progress=app[INFLIGHT])
    upstream = Upstream(app[SESSION], config.engine.url, supervisor.retry_after_s)
    app[SUPERVISOR] = supervisor
    app[UPSTREAM] = upstream
    app[GATE] = Gate(config.isolation, supervisor, app[INFLIGHT], config.engine)
    app[TOKENS] = TokenCounters(upstream)
    await supervisor.start()
    yield
    await supervisor.stop()
    await app[TOKENS].close()


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
    await fleet.start()
    yield
    await fleet.stop()
