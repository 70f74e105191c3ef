"""structlog, configured by the process entry point (never at import), and again by a live
reload that changes the `logging` section. Loggers are not cached on first use: a logger made
at import (`structlog.get_logger`) looks up the current level and renderer on each use, so a
new level applies to every module at once."""

from __future__ import annotations

import logging
import sys

import structlog

from gateway.config import LoggingConfig


def configure_logging(config: LoggingConfig) -> None:
    """JSON lines when not on a terminal (what a log collector reads), readable on a terminal."""
    level = logging.getLevelNamesMapping().get(config.level.upper(), logging.INFO)
    fmt = config.format
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
