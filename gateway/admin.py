"""The operator's listener: the effective configuration, the quarantine and the suspects, the
engine's state and its recent changes, restart the engine, reload the config now.

Bound to loopback by default and never served on the client port. Bound elsewhere, every
request needs `Authorization: Bearer <token>`, the token read from the environment variable
named by `admin.token_env` when the app is made; without one the gateway refuses to start.
Every request is logged (`admin_request`), refused ones as warnings.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Iterable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from engine.state import EngineState
from gateway.config import AdminConfig, ConfigError
from gateway.errors import Conflict, GuardError, NotFound, Unauthorized, error_body
from gateway.keys import (
    ADMIN_TOKEN,
    CONFIG,
    ENGINE_HISTORY,
    GATE,
    INFLIGHT,
    LIFECYCLE,
    MAIN_APP,
    RELOADER,
    SUPERVISOR,
)
from gateway.middlewares import render_error
from gateway.reload import Outcome, Trigger
from gateway.requestlog import request_id_from
from gateway.status import effective_config

log = structlog.get_logger("gateway.admin")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and the name localhost; anything else (0.0.0.0, "", a name) is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def admin_token(config: AdminConfig, environ: dict[str, str] | None = None) -> str | None:
    """The bearer token the listener requires, None on loopback. Raises ConfigError when
    it is bound elsewhere and the environment holds no token."""
    if is_loopback(config.host):
        return None
    token = (environ if environ is not None else os.environ).get(config.token_env, "")
    if not token.strip():
        raise ConfigError(
            f"admin.host {config.host!r} is not loopback: the admin listener requires a bearer "
            f"token in the environment variable {config.token_env} (admin.token_env), "
            "which is unset or empty"
        )
    return token.strip()


@web.middleware
async def admin_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request_id_from(request.headers.get("X-Request-Id"))
    token = request.app[ADMIN_TOKEN]
    peer = request.remote
    try:
        if token:
            given = request.headers.get("Authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                value.strip().encode(), token.encode()
            ):
                raise Unauthorized(
                    "The admin listener requires Authorization: Bearer <token>.",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        resp = await handler(request)
    except GuardError as err:
        resp = render_error(err, request_id)
    except web.HTTPException as exc:
        body = error_body(exc.text or exc.reason, exc.reason, None, exc.status)
        resp = web.json_response(body, status=exc.status)
    level = "warning" if resp.status in {401, 403} else "info"
    getattr(log, level)(
        "admin_request",
        method=request.method,
        path=request.path,
        status=resp.status,
        peer=peer,
        request_id=request_id,
    )
    return resp


def _main(request: web.Request) -> web.Application:
    return request.app[MAIN_APP]


async def list_quarantine(request: web.Request) -> web.Response:
    """Fingerprint, model, since, until, reason: never the prompt text."""
    gate = _main(request)[GATE]
    entries = [e.public() for e in gate.quarantine.entries(gate.wall_clock())]
    return web.json_response({"quarantine": entries, "suspects": len(gate.suspects)})


async def clear_quarantine(request: web.Request) -> web.Response:
    gate = _main(request)[GATE]
    cleared = gate.quarantine.clear()
    log.info("admin_quarantine_cleared", cleared=cleared)
    return web.json_response({"cleared": cleared})


async def remove_entry(request: web.Request) -> web.Response:
    gate = _main(request)[GATE]
    fp = request.match_info["fingerprint"]
    if gate.quarantine.remove(fp):
        log.info("admin_quarantine_cleared", cleared=1, fingerprint=fp)
        return web.json_response({"cleared": 1})
    return web.json_response({"cleared": 0}, status=404)


def _suspects(main: web.Application) -> list[dict[str, Any]]:
    gate = main[GATE]
    return [
        {
            "fingerprint": s.fingerprint,
            "model": s.model,
            "failures": s.failures,
            "last_failure": s.last_failure,
        }
        for s in gate.suspects.entries(gate.wall_clock())
    ]


async def list_suspects(request: web.Request) -> web.Response:
    """Fingerprints in flight at an engine failure, awaiting a verdict (probation)."""
    return web.json_response({"suspects": _suspects(_main(request))})


def _reload_view(main: web.Application) -> dict[str, Any]:
    reloader = main.get(RELOADER)
    if reloader is None:
        return {"path": None, "generation": 1, "watching": False}
    state = reloader.state
    return {
        "path": state.path,
        "watching": True,
        "generation": state.generation,
        "loaded_at": state.loaded_at,
        "applied": state.applied,
        "failures": state.failures,
        "last_reload": state.last.public() if state.last is not None else None,
        "pending_gateway_restart": list(state.pending_gateway_restart),
        "pending_engine_restart": list(state.pending_engine_restart),
        "warnings": list(state.warnings),
    }


def _engine_view(main: web.Application) -> dict[str, Any]:
    supervisor = main[SUPERVISOR]
    history = main[ENGINE_HISTORY]
    return {
        "state": supervisor.state.value,
        "supervised": supervisor.supervised,
        "live": supervisor.live(),
        "epoch": supervisor.epoch,
        "pid": supervisor.pid,
        "version": history.version,
        "models": dict(supervisor.models),
        "recent_changes": history.public(),
    }


async def show_config(request: web.Request) -> web.Response:
    """The effective configuration, each value with its source, and the generation."""
    main = _main(request)
    return web.json_response(
        {
            "generation": _reload_view(main)["generation"],
            "effective": effective_config(main[CONFIG].current, main[SUPERVISOR].models),
        }
    )


async def show_engine(request: web.Request) -> web.Response:
    return web.json_response(_engine_view(_main(request)))


async def show_status(request: web.Request) -> web.Response:
    """Everything above at once: what `vllm-guard status` prints."""
    main = _main(request)
    gate = main[GATE]
    return web.json_response(
        {
            "config": _reload_view(main),
            "engine": _engine_view(main),
            "in_flight": len(main[INFLIGHT]),
            "draining": main[LIFECYCLE].draining,
            "quarantine": {
                "entries": [e.public() for e in gate.quarantine.entries(gate.wall_clock())],
                "suspects": _suspects(main),
            },
            "effective": effective_config(main[CONFIG].current, main[SUPERVISOR].models),
        }
    )


async def restart_engine(request: web.Request) -> web.Response:
    """Restart a supervised engine now (409 in the sidecar shape, or when it is not running)."""
    supervisor = _main(request)[SUPERVISOR]
    if not supervisor.supervised:
        raise Conflict(
            "The engine runs in its own container (sidecar shape): the gateway cannot "
            "restart it. Restart its container (kubectl delete pod, or its own probe)."
        )
    if supervisor.state not in {EngineState.READY, EngineState.STARTING}:
        raise Conflict(f"The engine is {supervisor.state.value}: no restart can be asked now.")
    log.warning("admin_engine_restart", state=supervisor.state.value)
    await supervisor.restart("asked on the admin listener")
    return web.json_response({"restarting": True, "state": supervisor.state.value}, status=202)


async def reload_now(request: web.Request) -> web.Response:
    """Read, validate and apply config.yaml now; the validation result (422 when invalid)."""
    reloader = _main(request).get(RELOADER)
    if reloader is None:
        raise Conflict("This gateway was not started from a config file: nothing to reload.")
    result = await reloader.reload(Trigger.ADMIN)
    status = 200 if result.outcome is Outcome.APPLIED else 422
    return web.json_response(result.public(), status=status)


async def not_found(request: web.Request) -> web.Response:
    raise NotFound(f"{request.method} {request.path} is not an admin route.")


def create_admin_app(
    main: web.Application, config: AdminConfig, *, extra_routes: Iterable[web.RouteDef] = ()
) -> web.Application:
    """The admin app over the main app's state (and `extra_routes`: the metrics, when they
    are served here). Raises ConfigError when it would listen off loopback without a token."""
    admin = web.Application(middlewares=[admin_middleware])
    admin[MAIN_APP] = main
    admin[ADMIN_TOKEN] = admin_token(config) or ""
    admin.router.add_get("/status", show_status)
    admin.router.add_get("/config", show_config)
    admin.router.add_get("/engine", show_engine)
    admin.router.add_post("/engine/restart", restart_engine)
    admin.router.add_post("/reload", reload_now)
    admin.router.add_get("/quarantine", list_quarantine)
    admin.router.add_delete("/quarantine", clear_quarantine)
    admin.router.add_delete("/quarantine/{fingerprint}", remove_entry)
    admin.router.add_get("/suspects", list_suspects)
    admin.router.add_routes(extra_routes)
    admin.router.add_route("*", "/{tail:.*}", not_found)
    return admin
