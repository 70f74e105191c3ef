"""Request handlers, one thin function per route: health, readiness, engine liveness, the two
generation endpoints (over the shared pipeline of `gateway.pipeline`), and the allow-listed
relay."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.body import read_body
from gateway.config import KSERVE_PREFIX
from gateway.errors import EngineFailed, EngineUnavailable, NotFound
from gateway.hardening import limit_relay
from gateway.keys import (
    CONFIG,
    FLEET,
    LIFECYCLE,
    MAIN_APP,
    RECORD,
    SUPERVISOR,
    UPSTREAM,
    VOCABULARIES,
)
from gateway.pipeline import CHAT, COMPLETIONS, generate
from gateway.proxy import (
    Answered,
    CutAfterBytes,
    end_stream_with_error,
    engine_answer,
    forward_headers,
    relay_response,
)
from gateway.requestlog import request_id_from


def canonical_path(path: str) -> str:
    """KServe clients call the engine's paths under /openai; the engine knows them without."""
    if path.startswith(KSERVE_PREFIX + "/"):
        return path[len(KSERVE_PREFIX) :]
    return path


async def health(request: web.Request) -> web.Response:
    """The gateway process is alive and serving. In the supervised shape it turns 503 once
    the supervisor has given up on the engine, so the orchestrator replaces the pod."""
    supervisor = request.app[SUPERVISOR]
    if supervisor.supervised and not supervisor.restart_expected():
        return web.json_response({"status": "engine given up"}, status=503)
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """The engine is usable now: read from the state the background probe keeps current."""
    supervisor = request.app[SUPERVISOR]
    state = str(supervisor.state)
    detail: dict[str, Any] = {"engine": state}
    if FLEET in request.app:  # shown, never in the status: the fleet part fails open
        detail["fleet"] = request.app[FLEET].detail()
    if supervisor.is_ready() and not request.app[LIFECYCLE].draining:
        return web.json_response({"status": "ready", **detail})
    reason = "draining" if request.app[LIFECYCLE].draining else supervisor.not_ready_reason
    return web.json_response(
        {"status": "not ready", **detail, "reason": reason},
        status=503,
        headers={"Retry-After": str(round(supervisor.retry_after_s()))},
    )


async def engine_live(request: web.Request) -> web.Response:
    """For the engine container's own livenessProbe (sidecar shape): 200 unless the gateway
    has seen the engine dead or wedged."""
    supervisor = request.app[SUPERVISOR]
    if supervisor.live():
        return web.json_response({"status": "live", "engine": str(supervisor.state)})
    return web.json_response({"status": "dead", "engine": str(supervisor.state)}, status=503)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions (also under /openai): admission, then the engine."""
    return await generate(request, CHAT)


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions (also under /openai): admission, then the engine."""
    return await generate(request, COMPLETIONS)


GENERATION_HANDLERS = {CHAT.path: chat_completions, COMPLETIONS.path: completions}
"""The routes that pass admission, by the path the engine knows them under."""


async def relay(request: web.Request) -> web.StreamResponse:
    """Everything that is not a generation path: relayed unchanged when allow-listed in
    config.yaml (`server.relay_paths`), else 404. Closed by default."""
    path = canonical_path(request.path)
    if f"{request.method} {path}" not in request.app[CONFIG].current.server.relay_set:
        raise NotFound(f"{request.method} {request.path} is not served by this gateway.")
    record = request[RECORD]
    record.endpoint = "relay"
    raw = await read_body(request)
    raw, extra = await limit_relay(
        request.app[VOCABULARIES], request.app[CONFIG].current, path, raw, record.fields
    )
    return await _relay(request, request.app, path, raw, extra)


async def engine_metrics(request: web.Request) -> web.StreamResponse:
    """GET /engine/metrics: the engine's own GET /metrics, relayed unchanged (the gateway's
    own are at /metrics; the two never share a response). Served where /metrics is, so on
    the admin listener too when `metrics.listener` is admin."""
    main = request.app.get(MAIN_APP, request.app)
    return await _relay(request, main, "/metrics", b"", {})


async def _relay(
    request: web.Request,
    app: web.Application,
    path: str,
    raw: bytes,
    extra: dict[str, str],
) -> web.StreamResponse:
    record = request.get(RECORD)  # None on the admin listener
    if record is not None:
        request_id = record.request_id
        record.mark_sent()
    else:
        request_id = request_id_from(request.headers.get("X-Request-Id"))
    retry_after_s = app[SUPERVISOR].retry_after_s
    try:
        upstream = await app[UPSTREAM].open(
            request.method, path, raw or None, forward_headers(request.headers, request_id)
        )
    except EngineFailed as err:
        raise EngineUnavailable(err.message, retry_after_s=retry_after_s()) from None
    outcome = await relay_response(
        request,
        upstream,
        {**extra, "X-Request-Id": request_id},
        None if record is None else (lambda _chunk: record.mark_first_byte()),
        write_timeout_s=app[CONFIG].current.server.client_write_timeout_s,
    )
    if isinstance(outcome, Answered):
        return outcome.response
    if isinstance(outcome, CutAfterBytes):
        await end_stream_with_error(outcome.stream, "The engine failed during the stream.")
        return outcome.stream
    return engine_answer(outcome, retry_after_s())
