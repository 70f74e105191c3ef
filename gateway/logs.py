"""structlog, configured by the process entry point (never at import), and again by a live
reload that changes the `logging` section. Loggers are not cached on first use: a logger made
at import (`structlog.get_logger`) looks up the current level and renderer on each use, so a
new level applies to every module at once. The one line every request writes goes through
`request_log()`, which keeps the logger it bound while structlog's configuration is the same
(binding costs about as much as rendering the line).

JSON lines are written by orjson (compact, the same keys in the same order), which renders a
line several times faster than the standard library; a value orjson cannot write (an integer
past 64 bits) makes that line fall back to the standard library, so no line is lost."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, MutableMapping
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


_bound: tuple[tuple[object, ...], Any] | None = None


def request_log() -> Any:
    """The logger of the canonical `request_finished` line: bound once per structlog
    configuration (a live reload's, or a test's `capture_logs`, makes it bind anew)."""
    global _bound
    config = structlog.get_config()
    key = (config["processors"], config["logger_factory"], config["wrapper_class"])
    if _bound is None or any(a is not b for a, b in zip(_bound[0], key, strict=True)):
        _bound = (key, structlog.get_logger("gateway").bind())
    return _bound[1]
