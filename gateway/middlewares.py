"""The one middleware around every request: request id, error rendering, the canonical log line.

Every error the gateway answers goes through `render_error`, in vLLM's envelope, with the
request id echoed. A 500 from the gateway itself is a bug, and is logged as one.
"""

from __future__ import annotations

import asyncio
import json

import structlog
from aiohttp import HttpVersion11, web
from aiohttp.typedefs import Handler

from gateway.config import KSERVE_PREFIX
from gateway.edge import (
    UNAUTHORIZED_BODY,
    authorized,
    encoding_refusal,
    expect_refusal,
    key_required,
)
from gateway.errors import GuardError, Quarantined, error_body
from gateway.keys import API_KEYS, CONFIG, METRICS, RECORD
from gateway.logs import log_request
from gateway.metrics import QUARANTINED
from gateway.proxy import ClientTooSlow
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
        resp = _refused_at_the_edge(request, record) or await handler(request)
    except GuardError as err:
        record.outcome = Outcome.REJECTED if err.status < 500 else Outcome.ENGINE_ERROR
        record.reason = record.reason or err.type
        record.cause = QUARANTINED if isinstance(err, Quarantined) else err.cause
        resp = render_error(err, record.request_id)
        # A refusal is often held by a frame it was raised from (a `Reject` names its
        # error), a cycle through the traceback that only the cyclic GC frees, with the
        # request's body in it: drop the traceback so the body goes now.
        err.with_traceback(None)
    except web.HTTPException as exc:
        record.outcome = Outcome.REJECTED
        resp = _render_http(exc, record.request_id)
    except (asyncio.CancelledError, ConnectionResetError) as exc:
        # The client went away (or stopped reading: cut now); the relay has already dropped
        # the engine's side and the gate freed the slot.
        if isinstance(exc, ClientTooSlow):
            record.reason = "client_write_timeout"
            record.fields["client_write_timeout_s"] = exc.timeout_s
            if request.transport is not None:
                request.transport.abort()
        record.outcome = Outcome.CLIENT_GONE
        record.status = 499  # nginx's "client closed request": no status reached anyone
        log_request(record.log_fields(None))
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
    if resp.status >= 400 and not resp.prepared and request.can_read_body:
        # A refused body is not read on (aiohttp would linger reading it): the connection
        # closes after the answer.
        resp.force_close()
    log_request(record.log_fields(nbytes))
    _count(request, record)
    return resp


def _count(request: web.Request, record: RequestRecord) -> None:
    """The request's metrics, once, beside its log line (none when metrics are off)."""
    metrics = request.app.get(METRICS)
    if metrics is not None:
        metrics.request_finished(record)


def _refused_at_the_edge(request: web.Request, record: RequestRecord) -> web.Response | None:
    """Refusals made on the head alone, before the body is read (gateway.edge): a
    compressed body (raised, 415), a missing or wrong API key (vLLM's own 401)."""
    refusal = encoding_refusal(request.headers.get("Content-Encoding"))
    if refusal is not None:
        record.reason = "content_encoding"
        raise refusal
    keys = request.app[API_KEYS]
    path = request.path.removeprefix(KSERVE_PREFIX)
    if (
        keys
        and key_required(request.method, path)
        and not authorized(request.headers.get("Authorization"), keys)
    ):
        record.outcome = Outcome.REJECTED
        record.reason = "unauthorized"
        return web.json_response(UNAUTHORIZED_BODY, status=401)
    return None


async def expect_handler(request: web.Request) -> web.Response | None:
    """`Expect: 100-continue`: a body announced over `server.max_body_bytes` is answered 413
    at once (no `100 Continue`, nothing read), in the envelope; else aiohttp's own handling.
    Runs before the middleware, so it writes the request's log line itself."""
    max_body = request.app[CONFIG].current.server.max_body_bytes
    refusal = expect_refusal(request.content_length, max_body)
    if refusal is None:
        refusal = encoding_refusal(request.headers.get("Content-Encoding"))
    if refusal is None:
        await _default_expect(request)
        return None
    record = RequestRecord(
        request_id_from(request.headers.get("X-Request-Id")), request.method, request.path
    )
    record.outcome, record.reason, record.status = Outcome.REJECTED, refusal.type, refusal.status
    resp = render_error(refusal, record.request_id)
    resp.force_close()
    log_request(record.log_fields(None))
    _count(request, record)
    return resp


async def _default_expect(request: web.Request) -> None:
    """aiohttp's: `100 Continue` for HTTP/1.1 (another expectation is ignored, not 417)."""
    expect = request.headers.get("Expect", "").lower()
    if request.version == HttpVersion11 and expect == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer's own head has not started
