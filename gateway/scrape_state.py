"""What /metrics reads at scrape time from the objects that hold the state: in flight and
queued by model (the gate), the engine's state, quarantine, suspects and probation (the gate's
isolation), config reloads. Nothing here is counted per request (gateway.metrics,
gateway.tallies)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.state import EngineState
from gateway.admission import Gate
from gateway.reload import ReloadState

ENGINE_STATES = tuple(s.value for s in EngineState if s is not EngineState.STOPPED)
"""States with a `vllm_guard_engine_state` sample (stopped is before start and after stop)."""


class StateCollector(Collector):
    """What is read at scrape time from the objects that hold it (set by the app factory as
    they are made)."""

    def __init__(
        self, model_label: Callable[[str | None], str], known_models: Callable[[], frozenset[str]]
    ) -> None:
        self.model_label, self.known_models = model_label, known_models
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
        label = self.model_label
        for family, counts in (
            (in_flight, {} if self.gate is None else self.gate.in_flight_by_model()),
            (queued, {} if self.gate is None else self.gate.waiting_by_model()),
        ):
            by_label = dict.fromkeys(self.known_models(), 0)
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
