"""The log setup (gateway.logs): the timestamp's format, and the request line's logger, bound
once per configuration yet following every reconfiguration (a reload's, `capture_logs`)."""

from __future__ import annotations

import datetime
import io
import json
import random
import sys

import pytest
import structlog

from gateway.config import LoggingConfig
from gateway.logs import UtcTimestamp, configure_logging, request_log


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
    request_log().info("request_finished", request_id="one")
    with structlog.testing.capture_logs() as captured:
        request_log().info("request_finished", request_id="two")
    request_log().info("request_finished", request_id="three")
    configure_logging(LoggingConfig(format="json", level="warning"))
    request_log().info("request_finished", request_id="four")
    assert [e["request_id"] for e in captured] == ["two"]
