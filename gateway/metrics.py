"""The gateway's Prometheus metrics: one registry per app, `vllm_guard_` names, bounded labels.

The catalogue (names, types, label values) is docs/metrics.md. Two kinds of recording:

- On the hot path, once per request, where the canonical `request_finished` line is written
  (`Metrics.request_finished`, from the middleware): requests, statuses, policy actions,
  tokens, the time the gateway added, time to first byte, shed requests, quarantine hits. Label
  children are resolved once per label set and kept.
- At scrape time, read from the objects that hold the state (`_StateCollector`): in flight and
  queued by model (the gate), engine state, quarantine and suspects, probation, reloads.

Engine restarts, failures and start durations come from the supervisor's state changes
(`Metrics.engine_changed`, a subscriber). A `model` label is a name from config or from the
engine's served list, else "unknown": never a client's string.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.supervisor import EngineState, StateChange
from gateway.admission import Gate
from gateway.config import Config
from gateway.reload import ReloadState
from gateway.requestlog import RequestRecord

UNKNOWN = "unknown"
"""The `model` label of a request whose model is neither configured nor served."""

BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
"""Seconds, from 50 µs: the gateway's own cost is sub-millisecond; TTFB may be minutes."""

ENGINE_STATES = tuple(s.value for s in EngineState if s is not EngineState.STOPPED)
"""States with a `vllm_guard_engine_state` sample (stopped is before start and after stop)."""

FAILURE_CAUSES: tuple[tuple[str, str], ...] = (
    ("engine exited", "exit"),
    ("cannot start the engine", "exit"),
    ("/health failed", "health"),
    ("wedged", "wedge"),
    ("the engine restarted without the gateway seeing it", "unseen_restart"),
    ("not ready within", "probe"),
)
"""The supervisor's failure reasons (how they begin) and their `cause` label."""


def failure_cause(reason: str) -> str | None:
    """The `cause` of a supervisor's FAILED transition, None for one that is no failure (an
    operator's restart)."""
    for prefix, cause in FAILURE_CAUSES:
        if reason.startswith(prefix):
            return cause
    return None


_DECODER = json.JSONDecoder()
"""Stateless (as json's own default decoder): made once rather than per answer."""


def usage_of(raw: bytes) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) of the last `"usage": {...}` object in an answer (a
    JSON body, or the SSE events of a stream's end), None when there is none. Reads only from
    the last `"usage"` on: the rest of the answer is never parsed."""
    at = raw.rfind(b'"usage"')
    while at >= 0:
        brace = raw.find(b"{", at)
        colon = raw.find(b":", at)
        if brace > colon >= 0 and raw[colon + 1 : brace].strip() == b"":
            try:
                usage, _ = _DECODER.raw_decode(raw[brace:].decode("utf-8", "replace"))
            except ValueError:
                return None
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if isinstance(prompt, int) and isinstance(completion, int):
                return prompt, completion
            return None
        at = raw.rfind(b'"usage"', 0, at)  # "usage": null in a later chunk
    return None


def action_label(action: str) -> str:
    """The policy `Action` value as a label: would-clamp → would_clamp."""
    return action.replace("-", "_")


class Metrics:
    """Every metric of one app, in its own registry."""

    def __init__(self, models: Callable[[], tuple[Config, Mapping[str, int]]]) -> None:
        """`models()`: the current config and the engine's served models, which bound the
        `model` label (read per request; the known set is rebuilt when either changes)."""
        self.registry = CollectorRegistry()
        r = self.registry
        self._models = models
        self._seen: tuple[object, object] | None = None
        self._known: frozenset[str] = frozenset()
        self.requests = Counter(
            "vllm_guard_requests",
            "Requests finished.",
            ["model", "endpoint", "outcome"],
            registry=r,
        )
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
        self.engine_restarts = Counter(
            "vllm_guard_engine_restarts", "Engine restarts (started, or seen back).", registry=r
        )
        self.engine_failures = Counter(
            "vllm_guard_engine_failures", "Engine failures detected.", ["cause"], registry=r
        )
        self.engine_last_start = Gauge(
            "vllm_guard_engine_last_start_seconds", "Duration of the last engine start.",
            registry=r,
        )  # fmt: skip
        self.client_write_timeouts = Counter(
            "vllm_guard_client_write_timeouts", "Clients cut for not reading their answer.",
            ["model"], registry=r,
        )  # fmt: skip
        self.state = _StateCollector(self)
        r.register(self.state)
        self._children: dict[tuple[str, str, str, int], _Children] = {}
        self._kept: dict[tuple[Counter, tuple[str, ...]], Counter] = {}
        self._starting_at: float | None = None
        self._clock = time.monotonic

    # -- the model label ---------------------------------------------------------------------

    def model_label(self, name: str | None) -> str:
        """`name` when it is configured or served, else "unknown"."""
        config, served = self._models()
        if self._seen is None or self._seen[0] is not config or self._seen[1] is not served:
            self._seen = (config, served)
            self._known = frozenset(config.models) | frozenset(served)
        return name if name is not None and name in self._known else UNKNOWN

    def known_models(self) -> frozenset[str]:
        self.model_label(None)
        return self._known

    # -- per request -------------------------------------------------------------------------

    def request_finished(self, record: RequestRecord) -> None:
        """Count one finished request (called once, where its log line is written)."""
        now = time.perf_counter()
        status = record.status or 0
        model = self.model_label(record.model)
        key = (model, record.endpoint, record.outcome.value, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = _Children(self, *key)
        children.requests.inc()
        children.responses.inc()
        if record.first_byte is not None:
            children.ttfb.observe(record.first_byte - record.started)
        if record.sent is not None:
            tail = 0.0 if record.last_byte is None else now - record.last_byte
            children.added.observe(record.sent - record.started - record.held + tail)
        if record.policy_action is not None:
            self._policy(model, record)
        if record.usage is not None and 200 <= status < 300:
            usage = usage_of(record.usage)
            if usage is not None:
                self._child(self.prompt_tokens, model).inc(usage[0])
                self._child(self.completion_tokens, model).inc(usage[1])
        if record.cause is not None:
            if record.cause == QUARANTINED:
                self.quarantine_hits.inc()
            else:
                self.shed.labels(str(status), record.cause).inc()
        if record.reason == CLIENT_WRITE_TIMEOUT:
            self.client_write_timeout(record.model)

    def _policy(self, model: str, record: RequestRecord) -> None:
        action = record.policy_action
        assert action is not None
        self._child(self.policy_actions, model, action).inc()
        if record.policy_reason is not None:
            self._child(self.policy_rejections, model, record.policy_reason).inc()

    def _child(self, metric: Counter, *labels: str) -> Counter:
        """`metric.labels(*labels)`, resolved once (every label here is bounded)."""
        key = (metric, labels)
        child = self._kept.get(key)
        if child is None:
            child = self._kept[key] = metric.labels(*labels)
        return child

    def client_write_timeout(self, model: str | None) -> None:
        """A client was cut for not reading its answer (issue 10's relay calls this, or the
        middleware's record says `reason=client_write_timeout`)."""
        self.client_write_timeouts.labels(self.model_label(model)).inc()

    # -- the engine --------------------------------------------------------------------------

    def engine_changed(self, change: StateChange) -> None:
        """A supervisor subscriber: restarts, failures by cause, the last start's duration."""
        new, old = change.new, change.old
        if new is EngineState.FAILED:
            cause = failure_cause(change.reason)
            if cause is not None:
                self.engine_failures.labels(cause).inc()
        if old is EngineState.RESTARTING and new in {EngineState.STARTING, EngineState.READY}:
            self.engine_restarts.inc()  # spawned again, or (sidecar) seen back
        if new in {EngineState.STARTING, EngineState.RESTARTING}:
            if new is EngineState.STARTING or self._starting_at is None:
                self._starting_at = self._clock()
        elif new is EngineState.READY and self._starting_at is not None:
            self.engine_last_start.set(self._clock() - self._starting_at)
            self._starting_at = None

    # -- hooks for other parts ---------------------------------------------------------------

    def watch_shared_store(self, up: Callable[[], bool]) -> None:
        """Export `vllm_guard_shared_store_up` (read from `up()` at each scrape). Called only
        when the shared quarantine is configured, so the family is absent otherwise."""
        gauge = Gauge(
            "vllm_guard_shared_store_up",
            "1 when the shared quarantine's store is reachable.",
            registry=self.registry,
        )
        gauge.set_function(lambda: 1.0 if up() else 0.0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


QUARANTINED = "quarantined"
"""`RequestRecord.cause` of a request the quarantine refused (counted as a hit, not shed)."""

CLIENT_WRITE_TIMEOUT = "client_write_timeout"
"""`RequestRecord.reason` of a client cut for not reading (issue 10)."""


class _Children:
    """The label children of one (model, endpoint, outcome, status), resolved once."""

    __slots__ = ("added", "requests", "responses", "ttfb")

    def __init__(self, m: Metrics, model: str, endpoint: str, outcome: str, status: int) -> None:
        self.requests = m.requests.labels(model, endpoint, outcome)
        self.responses = m.responses.labels(str(status))
        self.ttfb = m.ttfb.labels(model, endpoint)
        self.added = m.added.labels(model, endpoint)


class _StateCollector(Collector):
    """What is read at scrape time from the objects that hold it."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.gate: Gate | None = None
        self.engine_state: Callable[[], EngineState] | None = None
        self.reloads: ReloadState | None = None

    def collect(self) -> Iterator[Metric]:
        yield from self._requests_now()
        state = GaugeMetricFamily(
            "vllm_guard_engine_state", "1 for the engine's current state.", labels=["state"]
        )
        current = None if self.engine_state is None else self.engine_state().value
        for name in ENGINE_STATES:
            state.add_metric([name], 1.0 if name == current else 0.0)
        yield state
        yield from self._isolation()
        yield from self._reload()

    def _requests_now(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily(
            "vllm_guard_in_flight", "Requests in flight to the engine.", labels=["model"]
        )
        queued = GaugeMetricFamily(
            "vllm_guard_queued", "Requests waiting at the gate.", labels=["model"]
        )
        label = self.metrics.model_label
        for family, counts in (
            (in_flight, {} if self.gate is None else self.gate.in_flight_by_model()),
            (queued, {} if self.gate is None else self.gate.waiting_by_model()),
        ):
            by_label = dict.fromkeys(self.metrics.known_models(), 0)
            for model, count in counts.items():
                by_label[label(model)] = by_label.get(label(model), 0) + count
            for model, count in sorted(by_label.items()):
                family.add_metric([model], float(count))
            yield family

    def _isolation(self) -> Iterator[Metric]:
        gate = self.gate
        now = time.time() if gate is None else gate.wall_clock()
        entries = 0 if gate is None else len(gate.quarantine.entries(now))
        suspects = 0 if gate is None else len(gate.suspects.entries(now))
        yield _gauge("vllm_guard_quarantine_entries", "Fingerprints quarantined now.", entries)
        yield _counter(
            "vllm_guard_quarantine_added",
            "Fingerprints quarantined.",
            0 if gate is None else gate.quarantine.added,
        )
        yield _counter(
            "vllm_guard_quarantine_expired",
            "Quarantine entries that expired or were evicted.",
            0 if gate is None else gate.quarantine.expired,
        )
        yield _gauge("vllm_guard_suspects", "Fingerprints under suspicion now.", suspects)
        yield _counter(
            "vllm_guard_probation_runs",
            "Solo runs of suspects.",
            0 if gate is None else gate.probation_runs,
        )
        verdicts = CounterMetricFamily(
            "vllm_guard_probation_verdicts", "Probation outcomes.", labels=["verdict"]
        )
        for verdict in ("culprit", "innocent", "timeout"):
            verdicts.add_metric([verdict], 0 if gate is None else gate.verdicts[verdict])
        yield verdicts

    def _reload(self) -> Iterator[Metric]:
        state = self.reloads
        yield _gauge(
            "vllm_guard_config_generation",
            "The running config snapshot's generation.",
            1 if state is None else state.generation,
        )
        last = None if state is None else state.last
        yield _gauge(
            "vllm_guard_config_last_reload_timestamp_seconds",
            "Unix time of the last reload attempt (0 before the first).",
            0.0 if last is None else last.at,
        )
        reloads = CounterMetricFamily(
            "vllm_guard_config_reloads", "Reload attempts by result.", labels=["result"]
        )
        applied = 0 if state is None else state.applied - state.unchanged
        reloads.add_metric(["applied"], applied)
        reloads.add_metric(["invalid"], 0 if state is None else state.failures)
        reloads.add_metric(["unchanged"], 0 if state is None else state.unchanged)
        yield reloads


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


# -- the routes --------------------------------------------------------------------------------

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def metrics_handler(metrics: Metrics) -> Callable[[web.Request], Any]:
    """GET /metrics: this app's registry, Prometheus text."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    return handler
