"""Run the gateway until SIGTERM, then stop it gracefully. `listen` builds and starts the
servers from the config: `serve()` and the tests' gateways both use it, so server-level
settings are tested as they run in production."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import time
from dataclasses import dataclass

import structlog
from aiohttp import web

from gateway.config import Config
from gateway.keys import ADMIN_APP, CONFIG, INFLIGHT, LIFECYCLE, SUPERVISOR
from gateway.protocol import GuardedRunner

log = structlog.get_logger("gateway")


SHUTDOWN_TIMEOUT_S = 1.0
"""After the drain (or at a test's end), how long aiohttp waits for handlers still running."""

GC_YOUNG_THRESHOLD = 10_000
"""Allocations of container objects, net of those freed, between two collections of the
youngest generation (Python's default: 700). A request's own objects (its parsed body, its
record, aiohttp's request and response) are freed by reference counting when it ends; with
64 requests in flight the default let them reach the collector anyway, which then spent about
33 µs of CPU per request walking objects that were about to be freed (gen-2 passes of ~37 ms
over the whole heap among them; measured with `gc.callbacks` under wrk at c=64). At 10,000,
garbage in reference cycles is still collected, only in larger, rarer batches: the memory it
may hold meanwhile is bounded by the threshold."""


def tune_collector() -> None:
    """The cyclic garbage collector set for a server (`GC_YOUNG_THRESHOLD`); the older
    generations keep Python's thresholds."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


@dataclass(frozen=True)
class Listening:
    """The gateway's servers, started: the client listener and, when enabled, the admin one."""

    app: web.Application
    runner: web.AppRunner
    admin_runner: web.AppRunner | None

    @property
    def port(self) -> int:
        """The client port bound (config.server.port, or the one picked for port 0)."""
        return _bound_port(self.runner)

    @property
    def admin_port(self) -> int | None:
        return None if self.admin_runner is None else _bound_port(self.admin_runner)

    async def close(self) -> None:
        """Stop listening; the app's cleanup (the engine's stop among it) runs last."""
        if self.admin_runner is not None:
            await self.admin_runner.cleanup()
        await self.runner.cleanup()


def _bound_port(runner: web.AppRunner) -> int:
    address = runner.addresses[0]
    return int(address[1])


async def listen(app: web.Application, config: Config) -> Listening:
    """Build the runners and sites from the config and start them: the one place where
    server-level settings are made. Handlers are cancelled when their client goes away (so an
    abandoned generation stops at the engine); signals are `serve()`'s to handle. Bodies are
    never inflated (a compressed one is refused 415 by the middleware, see issue 10); each
    connection has a bounded time to send its headers (gateway.protocol) and to stay idle."""
    server = config.server
    runner = GuardedRunner(
        app,
        header_timeout_s=server.header_timeout_s,
        handle_signals=False,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        keepalive_timeout=server.keepalive_timeout_s,
        auto_decompress=False,
        lingering_time=0,
    )
    try:
        await runner.setup()
    except BaseException:  # a context failed to start (a config file it reads): undo the others
        await runner.cleanup()
        raise
    admin_runner = None
    try:
        await web.TCPSite(runner, config.server.host, config.server.port).start()
        if config.admin.enabled and ADMIN_APP in app:
            admin_runner = web.AppRunner(app[ADMIN_APP], handle_signals=False, access_log=None)
            await admin_runner.setup()
            await web.TCPSite(admin_runner, config.admin.host, config.admin.port).start()
    except BaseException:
        await Listening(app, runner, admin_runner).close()
        raise
    return Listening(app, runner, admin_runner)


async def serve(app: web.Application, config: Config) -> None:
    """Listen at once (probes must find the port open while the engine loads), run until
    SIGTERM or SIGINT, then drain: in-flight requests finish up to `shutdown_grace_s`,
    then the app's cleanup stops the engine."""
    tune_collector()
    listening = await listen(app, config)
    log.info(
        "gateway_listening",
        host=config.server.host,
        port=listening.port,
        engine=config.engine.url,
        supervised=app[SUPERVISOR].supervised,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        await drain(app, app[CONFIG].current.server.shutdown_grace_s)  # as last reloaded
    finally:
        await listening.close()
        log.info("gateway_stopped")


async def drain(app: web.Application, grace_s: float) -> None:
    app[LIFECYCLE].draining = True
    ledger = app[INFLIGHT]
    log.info("gateway_draining", in_flight=len(ledger), grace_s=grace_s)
    deadline = time.monotonic() + grace_s
    with contextlib.suppress(asyncio.CancelledError):
        while len(ledger) and time.monotonic() < deadline:  # noqa: ASYNC110 (polls a count)
            await asyncio.sleep(0.1)
    if len(ledger):
        log.warning("gateway_drain_deadline", in_flight=len(ledger))
