"""Run the gateway until SIGTERM, then stop it gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

import structlog
from aiohttp import web

from gateway.config import Config
from gateway.keys import ADMIN_APP, CONFIG, INFLIGHT, LIFECYCLE

log = structlog.get_logger("gateway")


async def serve(app: web.Application, config: Config) -> None:
    """Listen at once (probes must find the port open while the engine loads), run until
    SIGTERM or SIGINT, then drain: in-flight requests finish up to `shutdown_grace_s`,
    then the app's cleanup stops the engine."""
    runner = web.AppRunner(
        app, handle_signals=False, handler_cancellation=True, access_log=None, shutdown_timeout=1.0
    )
    try:
        await runner.setup()
    except BaseException:  # a context failed to start (a config file it reads): undo the others
        await runner.cleanup()
        raise
    sites = [web.TCPSite(runner, config.server.host, config.server.port)]
    if config.admin.enabled and ADMIN_APP in app:
        admin_runner = web.AppRunner(app[ADMIN_APP], handle_signals=False, access_log=None)
        await admin_runner.setup()
        sites.append(web.TCPSite(admin_runner, config.admin.host, config.admin.port))
    else:
        admin_runner = None
    for site in sites:
        await site.start()
    log.info(
        "gateway_listening",
        host=config.server.host,
        port=config.server.port,
        engine=config.engine.url,
        supervised=config.engine.command is not None,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        await drain(app, app[CONFIG].current.server.shutdown_grace_s)  # as last reloaded
    finally:
        if admin_runner is not None:
            await admin_runner.cleanup()
        await runner.cleanup()
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
