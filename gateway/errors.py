"""One error hierarchy. Every error the gateway itself answers is a `GuardError`; one middleware
renders it in vLLM's OpenAI envelope: {"error": {"message", "type", "param", "code"}}.

This module does not import aiohttp.web: policy and schemas raise these errors too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from enum import StrEnum
from typing import ClassVar


class Cause(StrEnum):
    """Why the gateway turned a request away (429/503): the `cause` label of
    `vllm_guard_shed_total`. Closed and bounded."""

    BULKHEAD = "bulkhead"
    """429: waited for a slot of its model's bulkhead past `queue_timeout_s`."""
    QUEUE_FULL = "queue_full"
    """429 or 503: the gate's queue held `queue_max` requests already."""
    QUEUE_TIMEOUT = "queue_timeout"
    """503: held for an engine restart past `queue_timeout_s`."""
    CLIENT_SHARE = "client_share"
    """429: the client holds its `max_in_flight_per_client` share (issue 10)."""
    ENGINE_DOWN = "engine_down"
    """503: the engine is failed or restarting and requests are not held for it."""
    ENGINE_STARTING = "engine_starting"
    """503: the engine is starting (not held), or its context length is not known yet."""
    GIVEN_UP = "given_up"
    """503: the supervisor gave up on the engine."""
    DRAINING = "draining"
    """503: the gateway is shutting down."""
    DEADLINE = "deadline"
    """429 or 503: the request's own deadline (`deadline_s`) passed while it waited."""


class GuardError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "InternalServerError"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after_s: float | None = None,
        headers: Mapping[str, str] | None = None,
        cause: Cause | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.cause = cause
        """Why a 429/503 turned the request away (a metric label); None for other errors."""
        merged = dict(headers or {})
        if retry_after_s is not None:
            merged["Retry-After"] = str(max(1, round(retry_after_s)))
        self.headers: Mapping[str, str] = merged

    def body(self) -> dict[str, object]:
        return error_body(self.message, self.type, self.param, self.status)


def error_body(message: str, type_: str, param: str | None, code: int) -> dict[str, object]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_bytes(message: str, type_: str, param: str | None, code: int) -> bytes:
    return json.dumps(error_body(message, type_, param, code)).encode()


class BadRequest(GuardError):
    status = 400
    type = "BadRequestError"


class NotFound(GuardError):
    status = 404
    type = "NotFoundError"


class MethodNotAllowed(GuardError):
    status = 405
    type = "MethodNotAllowed"


class RequestTimeout(GuardError):
    """The client took longer than `server.body_timeout_s` to send its body."""

    status = 408
    type = "RequestTimeoutError"


class PayloadTooLarge(GuardError):
    status = 413
    type = "RequestTooLargeError"


class UnsupportedMediaType(GuardError):
    status = 415
    type = "UnsupportedMediaTypeError"


class Unauthorized(GuardError):
    """The admin listener off loopback without the right bearer token."""

    status = 401
    type = "AuthenticationError"


class Conflict(GuardError):
    """An admin action the gateway's state does not allow (restart in the sidecar shape)."""

    status = 409
    type = "ConflictError"


class Quarantined(GuardError):
    """A request identical to one that killed the engine. 422: the official OpenAI clients
    retry 408, 409, 429 and 5xx by themselves, and must not retry this."""

    status = 422
    type = "QuarantinedRequestError"


class Overloaded(GuardError):
    """The admission bulkhead and its queue are full: overload, try later."""

    status = 429
    type = "RateLimitError"


class BadGateway(GuardError):
    status = 502
    type = "BadGatewayError"


class EngineUnavailable(GuardError):
    """The engine cannot take the request now (down, starting, restarting, gave up)."""

    status = 503
    type = "ServiceUnavailableError"


class EngineUnreachable(EngineUnavailable):
    """One of admission's own exchanges with the engine (/tokenize, ...) found no engine: the
    connection was refused, reset or cut. Settled like a generation call (`Gate.exchange`)."""


class EngineErrored(EngineUnavailable):
    """One of admission's own exchanges with the engine (/tokenize, ...) was answered with a
    5xx: perhaps the engine died (vLLM answers a 500 after EngineDeadError). Settled like
    `EngineUnreachable` (`Gate.exchange`); when the engine turns out fine, it stands: a 503
    with Retry-After."""


class EngineTimeout(GuardError):
    status = 504
    type = "GatewayTimeoutError"


class EngineFailed(EngineUnavailable):
    """`Upstream.open` could not get an answer started: the engine refused the connection or
    dropped it before answering. The generation path reports it as an outcome
    (`proxy.FailedBeforeBytes`) and may retry; elsewhere it is a 503."""
