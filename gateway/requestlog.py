"""The canonical log line: one `request_finished` per request, with what the gateway did."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

_SAFE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def request_id_from(header: str | None) -> str:
    """The client's X-Request-Id when it is short and made of safe characters, else a new
    one (128 random bits in hex): it is echoed into logs and headers, so it must not carry
    anything else."""
    if header is not None and _SAFE_ID.fullmatch(header):
        return header
    return os.urandom(16).hex()


class Outcome(StrEnum):
    """How a request ended, as its log line says. Closed and bounded: usable as a metric label."""

    OK = "ok"
    """Answered (by the engine, or the engine's own error relayed)."""
    REJECTED = "rejected"
    """Refused by the gateway with a 4xx (policy, schema, quarantine, overload)."""
    ENGINE_ERROR = "engine_error"
    """Answered with a 5xx because of the engine (down, restarting, timed out, unparseable)."""
    STREAM_CUT = "stream_cut"
    """The engine cut a stream that could not be resumed: it ended with an error event."""
    CLIENT_GONE = "client_gone"
    """The client went away before the answer was whole."""
    ERROR = "error"
    """A bug in the gateway (500)."""


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    model: str | None = None
    status: int | None = None
    outcome: Outcome = Outcome.OK
    reason: str | None = None
    first_byte: float | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    # What the metrics read (gateway.metrics), set along the way; none of it is logged.
    endpoint: str = "other"
    """chat, completions, relay (an allow-listed engine path) or other."""
    policy_action: str | None = None
    """The policy's action as a metric label (kept, ..., rejected, would_reject)."""
    policy_reason: str | None = None
    """The policy `Reason` of a refusal or (report mode) would-be refusal."""
    cause: str | None = None
    """Why the gateway turned the request away (`errors.Cause`), from the error answered."""
    sent: float | None = None
    """perf_counter when the first attempt was handed to the engine."""
    held: float = 0.0
    """Seconds held at the gate before that (queue, restart, probation)."""
    last_byte: float | None = None
    """perf_counter when the last bytes of the answer came from the engine."""
    usage: bytes | None = None
    """Where the engine's usage is: the whole answer, or the stream's last usage event."""

    def mark_first_byte(self) -> None:
        now = time.perf_counter()
        self.last_byte = now
        if self.first_byte is None:
            self.first_byte = now

    def mark_sent(self) -> None:
        if self.sent is None:
            self.sent = time.perf_counter()

    def log_fields(self, nbytes: int | None) -> dict[str, Any]:
        now = time.perf_counter()
        out: dict[str, Any] = {
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "model": self.model,
            "status": self.status,
            "outcome": self.outcome.value,
            "bytes": nbytes,
            "ttfb_ms": None
            if self.first_byte is None
            else round((self.first_byte - self.started) * 1000, 2),
            "duration_ms": round((now - self.started) * 1000, 2),
        }
        if self.reason is not None:
            out["reason"] = self.reason
        out.update(self.fields)
        return out
