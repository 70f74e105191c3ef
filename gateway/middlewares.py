"""The one middleware around every request: request id, error rendering, the canonical log line.

Every error the gateway answers goes through `render_error`, in vLLM's envelope, with the
request id echoed. A 500 from the gateway itself is a bug, and is logged as one.
"""

from __future__ import annotations

import asyncio
import json

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.errors import GuardError, Quarantined, error_body
from gateway.keys import METRICS, RECORD
from gateway.metrics import QUARANTINED
from gateway.requestlog import Outcome, RequestRecord, request_id_from

log = structlog.get_logger("gateway")

# aiohttp's own HTTP errors (a body over client_max_size, a malformed request line) get the
# same envelope; their vLLM-style type names:
_HTTP_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    405: "MethodNotAllowed",
    413: "RequestTooLargeError",
    415: "UnsupportedMediaTypeError",
}


def render_error(err: GuardError, request_id: str) -> web.Response:
    headers = {"X-Request-Id": request_id, **err.headers}
    return web.json_response(err.body(), status=err.status, headers=headers, dumps=_dumps)


def _dumps(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _render_http(exc: web.HTTPException, request_id: str) -> web.Response:
    status = exc.status
    message = exc.text or exc.reason
    if status == 413:
        message = f"The request body is too large ({message})."
    body = error_body(message, _HTTP_TYPES.get(status, exc.reason), None, status)
    return web.json_response(body, status=status, headers={"X-Request-Id": request_id})


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    record = RequestRecord(
        request_id_from(request.headers.get("X-Request-Id")), request.method, request.path
    )
    request[RECORD] = record
    try:
        resp = await handler(request)
    except GuardError as err:
        record.outcome = Outcome.REJECTED if err.status < 500 else Outcome.ENGINE_ERROR
        record.reason = record.reason or err.type
        record.cause = QUARANTINED if isinstance(err, Quarantined) else err.cause
        resp = render_error(err, record.request_id)
    except web.HTTPException as exc:
        record.outcome = Outcome.REJECTED
        resp = _render_http(exc, record.request_id)
    except (asyncio.CancelledError, ConnectionResetError):
        # The client went away; the relay has already dropped the engine's side.
        record.outcome = Outcome.CLIENT_GONE
        record.status = 499  # nginx's "client closed request": no status reached anyone
        log.info("request_finished", **record.log_fields(None))
        _count(request, record)
        raise
    except Exception:
        log.exception("gateway_bug", request_id=record.request_id)
        record.outcome = Outcome.ERROR
        resp = web.json_response(
            error_body(
                "The gateway failed on this request; this is a bug in vllm-guard.",
                "InternalServerError",
                None,
                500,
            ),
            status=500,
            headers={"X-Request-Id": record.request_id},
        )
    if not resp.prepared:
        resp.headers["X-Request-Id"] = record.request_id
        nbytes = (
            resp.body_length
            if resp.body_length
            else (
                len(resp.body)
                if isinstance(resp, web.Response) and isinstance(resp.body, bytes)
                else None
            )
        )
    else:
        nbytes = resp.body_length
    record.status = resp.status
    log.info("request_finished", **record.log_fields(nbytes))
    _count(request, record)
    return resp


def _count(request: web.Request, record: RequestRecord) -> None:
    """The request's metrics, once, beside its log line (none when metrics are off)."""
    metrics = request.app.get(METRICS)
    if metrics is not None:
        metrics.request_finished(record)
