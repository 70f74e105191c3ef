"""The log setup (gateway.logs): the timestamp's format, and the request line, written as
structlog's own logger writes it, its setup kept per configuration yet following every
reconfiguration (a reload's, `capture_logs`)."""

from __future__ import annotations

import datetime
import io
import json
import random
import sys

import pytest
import structlog

from gateway.config import LoggingConfig
from gateway.logs import UtcTimestamp, configure_logging, log_request


def test_timestamp_is_iso_utc_to_the_microsecond() -> None:
    """The stamp reads back as the clock's time within a microsecond, in structlog's ISO UTC
    form with six fraction digits, across second boundaries (each second formatted anew)."""
    rng = random.Random(7)
    times = sorted(rng.uniform(0, 4e9) for _ in range(500))
    times += [1764586029.0, 1764586029.999999, 1764586030.000001]
    clock = iter(times)
    stamp = UtcTimestamp(clock=lambda: next(clock))
    for expected in times:
        text = stamp(None, "info", {})["timestamp"]
        assert len(text) == 27, text
        assert text.endswith("Z"), text
        read = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
            tzinfo=datetime.UTC
        )
        assert abs(read.timestamp() - expected) < 2e-6


FIELDS: dict[str, object] = {
    "request_id": "5f1c",
    "method": "POST",
    "path": "/v1/chat/completions",
    "model": "tiny",
    "status": 200,
    "outcome": "ok",
    "bytes": 612,
    "ttfb_ms": None,
    "duration_ms": 5.43,
    "fingerprint": "ab" * 16,
    "prompt_tokens": 432,
    "text": 'é 😀 \n"quoted"',
    "big": 2**70,
}


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_the_request_line_is_structlogs_own(monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    """log_request writes, for the same fields, the very line structlog's logger writes (keys,
    order, values, an integer past 64 bits included), timestamps aside, in both formats."""
    raw = io.BytesIO()
    text = io.TextIOWrapper(raw, write_through=True)
    monkeypatch.setattr(sys, "stderr", text)
    monkeypatch.setattr(UtcTimestamp, "__call__", lambda _s, _l, _n, e: {**e, "timestamp": "t"})
    try:
        configure_logging(LoggingConfig(format=fmt, level="info"))
        structlog.get_logger("gateway").info("request_finished", **FIELDS)
        log_request(dict(FIELDS))
    finally:
        structlog.reset_defaults()
        text.detach()
    ours, theirs = raw.getvalue().splitlines()[1], raw.getvalue().splitlines()[0]
    assert ours == theirs
    if fmt == "json":
        line = json.loads(ours)
        assert list(line) == [*FIELDS, "event", "level", "timestamp"]
        assert line["big"] == 2**70


def test_request_logger_follows_every_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """The request line goes to the configured JSON output; inside `capture_logs` it is
    captured instead (the cached logger is bound anew), and after it goes to the output again;
    a new level applies at once."""
    raw = io.BytesIO()
    text = io.TextIOWrapper(raw, write_through=True)
    monkeypatch.setattr(sys, "stderr", text)
    try:
        _log_through_reconfigurations()
    finally:
        structlog.reset_defaults()
        text.detach()  # keep `raw` open
    lines = [json.loads(line) for line in raw.getvalue().splitlines()]
    assert [line["request_id"] for line in lines] == ["one", "three"]
    assert {"event", "level", "timestamp"} <= set(lines[0])
    assert lines[0]["event"] == "request_finished"
    assert lines[0]["level"] == "info"


def _log_through_reconfigurations() -> None:
    configure_logging(LoggingConfig(format="json", level="info"))
    log_request({"request_id": "one"})
    with structlog.testing.capture_logs() as captured:
        log_request({"request_id": "two"})
    log_request({"request_id": "three"})
    configure_logging(LoggingConfig(format="json", level="warning"))
    log_request({"request_id": "four"})
    assert [e["request_id"] for e in captured] == ["two"]
