"""The per-request metrics kept as tallies export exactly what prometheus_client's own metrics
did for the same finished requests, and a scrape never sees a histogram half-updated."""

from __future__ import annotations

import json
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import prometheus_client.metrics
import pytest
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import parse_config
from gateway.metrics import BUCKETS, Metrics, usage_of
from gateway.requestlog import Outcome, RequestRecord
from gateway.tallies import CounterTally, HistogramTally


class _Reference:
    """The per-request metrics as they were before the tallies: prometheus_client counters
    and histograms, declared in the same order with the same HELP, labels and buckets, and
    counted by the same rules. The state collector of the `Metrics` under test is shared, so
    the whole exposition can be compared."""

    def __init__(self, metrics: Metrics, now: Callable[[], float]) -> None:
        self.registry = r = CollectorRegistry()
        self.metrics, self.now = metrics, now
        self.requests = Counter(
            "vllm_guard_requests", "Requests finished.", ["model", "endpoint", "outcome"],
            registry=r,
        )  # fmt: skip
        self.responses = Counter(
            "vllm_guard_responses", "Responses by HTTP status code.", ["status"], registry=r
        )
        self.policy_actions = Counter(
            "vllm_guard_policy_actions", "What the token policy did.", ["model", "action"],
            registry=r,
        )  # fmt: skip
        self.policy_rejections = Counter(
            "vllm_guard_policy_rejections", "Policy refusals (and would-refusals) by reason.",
            ["model", "reason"], registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "vllm_guard_prompt_tokens", "Prompt tokens, from the engine's usage.", ["model"],
            registry=r,
        )  # fmt: skip
        self.completion_tokens = Counter(
            "vllm_guard_completion_tokens", "Completion tokens, from the engine's usage.",
            ["model"], registry=r,
        )  # fmt: skip
        self.added = Histogram(
            "vllm_guard_added_seconds",
            "Time the gateway adds: arrival until the engine has the request (time held at "
            "the gate excluded), plus from the engine's last bytes until the answer is done.",
            ["model", "endpoint"], buckets=BUCKETS, registry=r,
        )  # fmt: skip
        self.ttfb = Histogram(
            "vllm_guard_time_to_first_byte_seconds", "Arrival until the first byte to the client.",
            ["model", "endpoint"], buckets=BUCKETS, registry=r,
        )  # fmt: skip
        self.shed = Counter(
            "vllm_guard_shed", "Requests turned away (429, 503) by cause.", ["status", "cause"],
            registry=r,
        )  # fmt: skip
        self.quarantine_hits = Counter(
            "vllm_guard_quarantine_hits", "Requests refused 422 by the quarantine.", registry=r
        )
        Counter(
            "vllm_guard_engine_restarts", "Engine restarts (started, or seen back).", registry=r
        )
        Counter("vllm_guard_engine_failures", "Engine failures detected.", ["cause"], registry=r)
        Gauge(
            "vllm_guard_engine_last_start_seconds", "Duration of the last engine start.",
            registry=r,
        )  # fmt: skip
        self.client_write_timeouts = Counter(
            "vllm_guard_client_write_timeouts", "Clients cut for not reading their answer.",
            ["model"], registry=r,
        )  # fmt: skip
        r.register(metrics.state)

    def request_finished(self, record: RequestRecord) -> None:
        status = record.status or 0
        model = self.metrics.model_label(record.model)
        self.requests.labels(model, record.endpoint, record.outcome.value).inc()
        self.responses.labels(str(status)).inc()
        ttfb, added = (
            self.ttfb.labels(model, record.endpoint),
            self.added.labels(model, record.endpoint),
        )
        if record.first_byte is not None:
            ttfb.observe(record.first_byte - record.started)
        if record.sent is not None:
            tail = 0.0 if record.last_byte is None else self.now() - record.last_byte
            added.observe(record.sent - record.started - record.held + tail)
        if record.policy_action is not None:
            self.policy_actions.labels(model, record.policy_action).inc()
            if record.policy_reason is not None:
                self.policy_rejections.labels(model, record.policy_reason).inc()
        if record.usage is not None and 200 <= status < 300:
            usage = usage_of(record.usage)
            if usage is not None:
                self.prompt_tokens.labels(model).inc(usage[0])
                self.completion_tokens.labels(model).inc(usage[1])
        if record.cause == "quarantined":
            self.quarantine_hits.inc()
        elif record.cause is not None:
            self.shed.labels(str(status), record.cause).inc()
        if record.reason == "client_write_timeout":
            self.client_write_timeout(record.model)

    def client_write_timeout(self, model: str | None) -> None:
        self.client_write_timeouts.labels(self.metrics.model_label(model)).inc()


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": 0}


USAGES: tuple[bytes | None, ...] = (
    None,
    json.dumps({"choices": [], "usage": _usage(15, 8)}).encode(),
    b'data: {"choices": [], "usage": ' + json.dumps(_usage(3, 200)).encode() + b"}\n\n"
    b"data: [DONE]\n\n",
    json.dumps({"usage": None}).encode(),
    b'{"usage": {"prompt_tokens": 1',
)
"""Answers with usage (a JSON body, a stream's end), without, null and cut."""

TIMES: tuple[float | None, ...] = (None, 0.0, 0.00003, 0.001, 0.0025, 0.0031, 4.9, 125.0)
"""Seconds from arrival: none, zero, exactly on a bound (counted in it), between, past the
last bound (+Inf only)."""


@dataclass(frozen=True)
class _Kind:
    model: str | None
    endpoint: str
    outcome: Outcome
    status: int | None
    action: str | None = None
    reason: str | None = None
    cause: str | None = None
    why: str | None = None


KINDS = (
    _Kind("tiny", "chat", Outcome.OK, 200, "kept"),
    _Kind("tiny", "chat", Outcome.OK, 200, "clamped"),
    _Kind("other", "completions", Outcome.OK, 200, "would_reject", "max_tokens_over_limit"),
    _Kind("tiny", "chat", Outcome.REJECTED, 400, "rejected", "prompt_over_limit"),
    _Kind("a-client-string", "chat", Outcome.REJECTED, 404),
    _Kind(None, "other", Outcome.REJECTED, 401),
    _Kind("tiny", "chat", Outcome.REJECTED, 429, "kept", None, "queue_full"),
    _Kind("other", "completions", Outcome.ENGINE_ERROR, 503, None, None, "engine_restarting"),
    _Kind("tiny", "chat", Outcome.REJECTED, 422, "kept", None, "quarantined"),
    _Kind("tiny", "relay", Outcome.OK, 200),
    _Kind("tiny", "chat", Outcome.STREAM_CUT, 200, "kept"),
    _Kind("tiny", "chat", Outcome.CLIENT_GONE, 200, "kept", None, None, "client_write_timeout"),
    _Kind("unknown-too", "completions", Outcome.CLIENT_GONE, None),
    _Kind("other", "chat", Outcome.ERROR, 500, "would_clamp"),
    _Kind("tiny", "chat", Outcome.ENGINE_ERROR, 502),
)  # fmt: skip
"""Models (configured, served only, a client's, none), endpoints, outcomes, statuses, policy
actions and reasons, shed causes, a quarantine hit, a client write timeout."""

NOW = 200.0
"""The fixed `perf_counter` of the answer's end (both sides read it for the added tail); each
request arrives at 0, so a time on a bucket's bound is that bound exactly."""


def _records(seed: int, n: int) -> Iterator[RequestRecord | str]:
    """`n` finished requests drawn from the tables (and now and then a relay's write timeout,
    given as the model name it names)."""
    rng = random.Random(seed)
    for _ in range(n):
        if rng.random() < 0.03:
            yield rng.choice(("tiny", "a-client-string"))
            continue
        kind = rng.choice(KINDS)
        record = RequestRecord("id", "POST", "/v1/x", started=0.0)
        record.model, record.endpoint, record.status = kind.model, kind.endpoint, kind.status
        record.outcome, record.reason, record.cause = kind.outcome, kind.why, kind.cause
        record.policy_action, record.policy_reason = kind.action, kind.reason
        record.usage = rng.choice(USAGES)
        first, sent, tail = (rng.choice(TIMES) for _ in range(3))
        record.first_byte = None if first is None else record.started + first
        if sent is not None:
            record.held = rng.choice((0.0, 0.0, 0.5))
            record.sent = record.started + sent + record.held
            record.last_byte = None if tail is None else NOW - tail
        yield record


_CREATED = re.compile(r"^(\S+_created(?:\{.*\})?) (\S+)$")


def _without_created(text: str, since: float, until: float) -> str:
    """The exposition with each `_created` sample's value replaced by "T", once checked to be
    a time within [since, until]."""
    lines = []
    for line in text.splitlines():
        match = _CREATED.match(line)
        if match:
            assert since <= float(match.group(2)) <= until, line
            line = match.group(1) + " T"
        lines.append(line)
    return "\n".join(lines)


@pytest.mark.parametrize(("seed", "created"), [(1, True), (2, True), (3, True), (4, False)])
def test_the_tallies_export_what_prometheus_clients_metrics_did(
    seed: int, created: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """For the same random run of finished requests (every model, endpoint, outcome, status,
    usage, cause and timing of the tables), the whole /metrics text of the tallies is the old
    prometheus_client metrics' text, family order, HELP, labels, buckets and values alike;
    only the `_created` times differ, and they are present for the same series (or, with
    prometheus_client's `_created` series turned off, absent from both)."""
    monkeypatch.setattr(prometheus_client.metrics, "_use_created", created)  # its switch
    got = _compare(seed)
    assert ("_created" in got) is created


def _compare(seed: int) -> str:
    config = parse_config({"models": {"tiny": {}}})
    served = {"tiny": 512, "other": 512}
    since = time.time()
    metrics = Metrics(lambda: (config, served))
    metrics._now = lambda: NOW
    reference = _Reference(metrics, lambda: NOW)
    expected = generate_latest(reference.registry).decode()
    assert _without_created(metrics.exposition().decode(), since, time.time()) == (
        _without_created(expected, since, time.time())
    )
    for step, item in enumerate(_records(seed, 3000)):
        if isinstance(item, str):
            metrics.client_write_timeout(item)
            reference.client_write_timeout(item)
        else:
            metrics.request_finished(item)
            reference.request_finished(item)
        if step < 60 or step % 250 == 249:  # each step while label sets are new, then now and then
            got = _without_created(metrics.exposition().decode(), since, time.time())
            want = _without_created(
                generate_latest(reference.registry).decode(), since, time.time()
            )
            assert got == want
    assert 'vllm_guard_shed_total{cause="queue_full",status="429"}' in got
    assert "vllm_guard_quarantine_hits_total " in got
    assert 'vllm_guard_client_write_timeouts_total{model="unknown"}' in got
    return got


def _histograms(text: str) -> Iterator[tuple[str, dict[str, float]]]:
    """Each histogram series of a scrape: its labels, and its samples (`le=...` buckets, count)."""
    for family in text_string_to_metric_families(text):
        if family.type != "histogram":
            continue
        series: dict[str, dict[str, float]] = {}
        for s in family.samples:
            labels = {k: v for k, v in s.labels.items() if k != "le"}
            key = json.dumps(labels, sort_keys=True)
            if s.name.endswith("_bucket"):
                series.setdefault(key, {})["le=" + s.labels["le"]] = s.value
            elif s.name.endswith("_count"):
                series.setdefault(key, {})["count"] = s.value
        yield from ((f"{family.name}{k}", v) for k, v in series.items())


def test_a_scrape_while_requests_finish_sees_every_histogram_whole() -> None:
    """Scrapes from another thread while requests finish as fast as they can (the interpreter
    switching threads every 5 µs): in every scrape each histogram's count is its +Inf bucket,
    its buckets only grow with the bound, and nothing shrinks from one scrape to the next."""
    config = parse_config({"models": {"tiny": {}, "other": {}}})
    metrics = Metrics(lambda: (config, {}))
    records = [r for r in _records(7, 500) if isinstance(r, RequestRecord)]
    stop = threading.Event()

    def finish() -> None:
        for _ in range(10_000):  # bounded; stopped as soon as the scrapes are done
            for record in records:
                metrics.request_finished(record)
            if stop.is_set():
                return

    switch = sys.getswitchinterval()
    sys.setswitchinterval(5e-6)
    worker = threading.Thread(target=finish)
    worker.start()
    try:
        seen: dict[str, dict[str, float]] = {}
        deadline = time.monotonic() + 10
        scrapes = 0
        while scrapes < 50 and time.monotonic() < deadline and worker.is_alive():
            for name, samples in _histograms(metrics.exposition().decode()):
                assert samples["count"] == samples["le=+Inf"], (name, samples)
                buckets = [v for k, v in samples.items() if k.startswith("le=")]
                assert buckets == sorted(buckets), (name, samples)
                before = seen.get(name, {})
                assert all(samples[k] >= v for k, v in before.items()), (name, before, samples)
                seen[name] = samples
            scrapes += 1
    finally:
        stop.set()
        worker.join(30)
        sys.setswitchinterval(switch)
    assert scrapes >= 20
    assert seen
    assert max(s["count"] for s in seen.values()) > 0


def test_a_tally_counts_as_prometheus_client_spells_it() -> None:
    """A histogram counts a value in the first bucket whose bound is at least it (past the
    last bound: +Inf only); an unlabelled counter exists at 0; unsorted bounds are refused."""
    hist = HistogramTally("h", "H.", ["a"], [0.1, 1.0])
    assert hist.le == ("0.1", "1.0", "+Inf")
    cell = hist.cell("x")
    for v in (0.1, 0.5, 1.0, 1.5, 0.0):
        cell.observe(v)
    assert cell.counts == [2, 2, 1]
    assert cell.sum == pytest.approx(3.1)
    counter = CounterTally("c", "C.")
    assert [(s.name, s.value) for s in counter.family().samples if s.name == "c_total"] == [
        ("c_total", 0)
    ]
    with pytest.raises(ValueError, match="sorted"):
        HistogramTally("h", "H.", [], [1.0, 0.1])


def test_a_negative_usage_is_not_counted() -> None:
    """An answer whose usage has a negative count adds no tokens (prometheus_client refused
    a negative increment with an error in the middleware; the counters still only go up)."""
    config = parse_config({"models": {"tiny": {}}})
    metrics = Metrics(lambda: (config, {}))
    for usage in (_usage(-5, 3), _usage(4, 2)):
        record = RequestRecord("id", "POST", "/v1/chat/completions")
        record.model, record.endpoint, record.status = "tiny", "chat", 200
        record.usage = json.dumps({"usage": usage}).encode()
        metrics.request_finished(record)
    text = metrics.exposition().decode()
    assert 'vllm_guard_prompt_tokens_total{model="tiny"} 4.0' in text
    assert 'vllm_guard_completion_tokens_total{model="tiny"} 2.0' in text
