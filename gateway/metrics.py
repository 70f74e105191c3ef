"""The gateway's Prometheus metrics: one registry per app, `vllm_guard_` names, bounded labels.

The catalogue (names, types, label values) is docs/metrics.md. Two kinds of recording:

- On the hot path, once per request, where the canonical `request_finished` line is written
  (`Metrics.request_finished`, from the middleware): requests, statuses, policy actions,
  tokens, the time the gateway added, time to first byte, shed requests, quarantine hits,
  client write timeouts. These are plain tallies (gateway.tallies), updated on the event loop
  without a lock and turned into metric families at each scrape; the cells one kind of request
  adds to are found once and kept.
- At scrape time, read from the objects that hold the state (gateway.scrape_state): in flight
  and queued by model (the gate), engine state, quarantine and suspects, probation, reloads.

Engine restarts, failures and start durations come from the supervisor's state changes
(`Metrics.engine_changed`, a subscriber), on prometheus_client's own (locked) metrics. A
`model` label is a name from config or from the engine's served list, else "unknown": never a
client's string.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from engine.state import EngineState, StateChange
from gateway.config import Config
from gateway.requestlog import RequestRecord
from gateway.scrape_state import StateCollector
from gateway.tallies import CounterTally, HistogramTally, TallyCollector

UNKNOWN = "unknown"
"""The `model` label of a request whose model is neither configured nor served."""

BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
"""Seconds, from 50 µs: the gateway's own cost is sub-millisecond; TTFB may be minutes."""

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
                # A negative count is none: the token counters only go up.
                return (prompt, completion) if prompt >= 0 and completion >= 0 else None
            return None
        at = raw.rfind(b'"usage"', 0, at)  # "usage": null in a later chunk
    return None


def action_label(action: str) -> str:
    """The policy `Action` value as a label: would-clamp → would_clamp."""
    return action.replace("-", "_")


class Metrics:
    """Every metric of one app, in its own registry. The per-request ones are tallies
    (gateway.tallies): plain counts updated without a lock, so `request_finished` and
    `client_write_timeout` must be called on the app's event loop (they are: from the
    middleware and the relay). The engine's, updated by the supervisor's subscriber, are
    prometheus_client metrics."""

    def __init__(self, models: Callable[[], tuple[Config, Mapping[str, int]]]) -> None:
        """`models()`: the current config and the engine's served models, which bound the
        `model` label (read per request; the known set is rebuilt when either changes)."""
        self.registry = CollectorRegistry()
        r = self.registry
        self._models = models
        self._seen: tuple[object, object] | None = None
        self._known: frozenset[str] = frozenset()
        self.requests = CounterTally(
            "vllm_guard_requests", "Requests finished.", ["model", "endpoint", "outcome"]
        )
        self.responses = CounterTally(
            "vllm_guard_responses", "Responses by HTTP status code.", ["status"]
        )
        self.policy_actions = CounterTally(
            "vllm_guard_policy_actions", "What the token policy did.", ["model", "action"]
        )
        self.policy_rejections = CounterTally(
            "vllm_guard_policy_rejections", "Policy refusals (and would-refusals) by reason.",
            ["model", "reason"],
        )  # fmt: skip
        self.prompt_tokens = CounterTally(
            "vllm_guard_prompt_tokens", "Prompt tokens, from the engine's usage.", ["model"]
        )
        self.completion_tokens = CounterTally(
            "vllm_guard_completion_tokens", "Completion tokens, from the engine's usage.",
            ["model"],
        )  # fmt: skip
        self.added = HistogramTally(
            "vllm_guard_added_seconds",
            "Time the gateway adds: arrival until the engine has the request (time held at "
            "the gate excluded), plus from the engine's last bytes until the answer is done.",
            ["model", "endpoint"], BUCKETS,
        )  # fmt: skip
        self.ttfb = HistogramTally(
            "vllm_guard_time_to_first_byte_seconds", "Arrival until the first byte to the client.",
            ["model", "endpoint"], BUCKETS,
        )  # fmt: skip
        self.shed = CounterTally(
            "vllm_guard_shed", "Requests turned away (429, 503) by cause.", ["status", "cause"]
        )
        self.quarantine_hits = CounterTally(
            "vllm_guard_quarantine_hits", "Requests refused 422 by the quarantine."
        )
        r.register(
            TallyCollector(
                (
                    self.requests,
                    self.responses,
                    self.policy_actions,
                    self.policy_rejections,
                    self.prompt_tokens,
                    self.completion_tokens,
                    self.added,
                    self.ttfb,
                    self.shed,
                    self.quarantine_hits,
                )
            )
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
        self.client_write_timeouts = CounterTally(
            "vllm_guard_client_write_timeouts", "Clients cut for not reading their answer.",
            ["model"],
        )  # fmt: skip
        r.register(TallyCollector((self.client_write_timeouts,)))  # (where it was exported)
        self.state = StateCollector(self.model_label, self.known_models)
        r.register(self.state)
        self._rows: dict[tuple[object, ...], _Row] = {}
        self._starting_at: float | None = None
        self._clock = time.monotonic
        self._now = time.perf_counter  # when the answer is done (a test may set both)

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
        """Count one finished request (called once, where its log line is written, on the
        loop). Every cell a request adds to is found by one lookup of its labels' row."""
        status = record.status or 0
        model = self.model_label(record.model)
        key = (
            model,
            record.endpoint,
            record.outcome,
            status,
            record.policy_action,
            record.policy_reason,
            record.cause,
            record.reason == CLIENT_WRITE_TIMEOUT,
        )
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = _Row(self, record, model, status)
        for cell in row.ones:
            cell[0] += 1
        if record.first_byte is not None:
            row.ttfb.observe(record.first_byte - record.started)
        if record.sent is not None:
            last = record.last_byte
            tail = 0.0 if last is None else self._now() - last
            row.added.observe(record.sent - record.started - record.held + tail)
        if record.usage is not None and row.counts_tokens:
            self._tokens(row, model, record.usage)

    def _tokens(self, row: _Row, model: str, raw: bytes) -> None:
        usage = usage_of(raw)
        if usage is not None:
            if row.tokens is None:  # made at the first usage read, not before
                row.tokens = (self.prompt_tokens.cell(model), self.completion_tokens.cell(model))
            prompt, completion = row.tokens
            prompt[0] += usage[0]
            completion[0] += usage[1]

    def client_write_timeout(self, model: str | None) -> None:
        """A client was cut for not reading its answer (issue 10's relay calls this, or the
        middleware's record says `reason=client_write_timeout`)."""
        self.client_write_timeouts.cell(self.model_label(model))[0] += 1

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


class _Row:
    """The cells one kind of request adds to (its labels and what it carries), found once:
    `ones` gain 1 per request (requests, responses, and as it applies the policy's action and
    refusal reason, the shed cause or quarantine hit, the client write timeout)."""

    __slots__ = ("added", "counts_tokens", "ones", "tokens", "ttfb")

    def __init__(self, m: Metrics, record: RequestRecord, model: str, status: int) -> None:
        endpoint = record.endpoint
        ones = [
            m.requests.cell(model, endpoint, record.outcome.value),
            m.responses.cell(str(status)),
        ]
        self.ttfb = m.ttfb.cell(model, endpoint)
        self.added = m.added.cell(model, endpoint)
        action, reason = record.policy_action, record.policy_reason
        if action is not None:
            ones.append(m.policy_actions.cell(model, action))
            if reason is not None:
                ones.append(m.policy_rejections.cell(model, reason))
        if record.cause == QUARANTINED:
            ones.append(m.quarantine_hits.cell())
        elif record.cause is not None:
            ones.append(m.shed.cell(str(status), record.cause))
        if record.reason == CLIENT_WRITE_TIMEOUT:
            ones.append(m.client_write_timeouts.cell(model))
        self.ones = tuple(ones)
        self.counts_tokens = 200 <= status < 300  # an error answer's usage is not counted
        self.tokens: tuple[list[float], list[float]] | None = None


# -- the routes --------------------------------------------------------------------------------

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def metrics_handler(metrics: Metrics) -> Callable[[web.Request], Any]:
    """GET /metrics: this app's registry, Prometheus text."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    return handler
