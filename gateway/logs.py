"""structlog, configured by the process entry point (never at import), and again by a live
reload that changes the `logging` section. Loggers are not cached on first use: a logger made
at import (`structlog.get_logger`) looks up the current level and renderer on each use, so a
new level applies to every module at once. The one line every request writes goes through
`log_request()`, which runs the configured processors on the request's own fields, with what
it needs kept while structlog's configuration is the same (binding a logger per line, and a
bound logger's copies of the fields, cost about as much as rendering the line).

JSON lines are written by orjson (compact, the same keys in the same order), which renders a
line several times faster than the standard library; a value orjson cannot write (an integer
past 64 bits) makes that line fall back to the standard library, so no line is lost."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import structlog

from gateway.config import LoggingConfig


def configure_logging(config: LoggingConfig) -> None:
    """JSON lines when not on a terminal (what a log collector reads), readable on a terminal."""
    level = logging.getLevelNamesMapping().get(config.level.upper(), logging.INFO)
    fmt = config.format
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.types.Processor
    factory: Callable[..., Any]
    buffer = getattr(sys.stderr, "buffer", None)  # None when stderr is a text-only stand-in
    if fmt == "console" or buffer is None:
        renderer = (
            structlog.dev.ConsoleRenderer()
            if fmt == "console"
            else structlog.processors.JSONRenderer(serializer=_json_text)
        )
        factory = structlog.PrintLoggerFactory(file=sys.stderr)
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_json_line)
        factory = structlog.BytesLoggerFactory(file=buffer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            UtcTimestamp(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )


def _json_line(event: dict[str, Any], **kw: Any) -> bytes:
    """One log line's JSON (structlog passes `default`, its handler of other objects)."""
    try:
        return orjson.dumps(event, default=kw.get("default"), option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return json.dumps(event, **kw).encode("utf-8", "backslashreplace")


def _json_text(event: dict[str, Any], **kw: Any) -> str:
    return _json_line(event, **kw).decode("utf-8", "backslashreplace")


class UtcTimestamp:
    """The `timestamp` of a line in ISO 8601, UTC, to the microsecond
    (`2026-12-01T10:47:09.123456Z`): structlog's `TimeStamper(fmt="iso", utc=True)` format,
    with its date and time of day formatted once per second instead of per line."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._second = -1
        self._prefix = ""

    def __call__(
        self, _logger: object, _name: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        now = self._clock()
        second = int(now)
        if second != self._second:
            self._second, self._prefix = (
                second,
                time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)),
            )
        event["timestamp"] = f"{self._prefix}.{int((now - second) * 1_000_000):06d}Z"
        return event


@dataclass(frozen=True, slots=True)
class _RequestLine:
    """What the request line is written with under one structlog configuration."""

    processors: Sequence[Any]
    factory: Any
    wrapper_class: Any
    logger: Any
    """The configured logger factory's logger (what a bound logger wraps)."""
    enabled: bool
    """Whether the configured level lets an info line through."""


_line: _RequestLine | None = None


def log_request(fields: dict[str, Any]) -> None:
    """Write the canonical `request_finished` line: what
    `structlog.get_logger("gateway").info("request_finished", **fields)` writes (the same
    processors, the same logger, the same keys in the same order), with `fields`, the
    caller's own dict, as the event dict instead of a bound logger's two copies of it (half
    the line's cost). Follows every reconfiguration (a reload's, a test's `capture_logs`)."""
    line = _request_line()
    if not line.enabled:
        return
    fields["event"] = "request_finished"
    event: Any = fields
    try:
        for processor in line.processors:
            event = processor(line.logger, "info", event)
    except structlog.DropEvent:
        return
    # The final processor's result, passed on as a bound logger passes it.
    if isinstance(event, str | bytes | bytearray):
        line.logger.info(event)
    elif isinstance(event, tuple):
        line.logger.info(*event[0], **event[1])
    else:
        line.logger.info(**event)


def _request_line() -> _RequestLine:
    global _line
    config = structlog.get_config()
    line = _line
    if (
        line is None
        or line.processors is not config["processors"]
        or line.factory is not config["logger_factory"]
        or line.wrapper_class is not config["wrapper_class"]
    ):
        enabled = getattr(structlog.get_logger("gateway").bind(), "is_enabled_for", None)
        line = _line = _RequestLine(
            config["processors"],
            config["logger_factory"],
            config["wrapper_class"],
            config["logger_factory"]("gateway"),
            True if enabled is None else bool(enabled(logging.INFO)),
        )
    return line
