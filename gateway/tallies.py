"""Per-request metrics as plain in-process tallies, exported at scrape time.

prometheus_client's `Counter.inc()` and `Histogram.observe()` each take a lock and go through
several Python calls; a request makes about six of them, which was most of what counting it
cost. Here a counter is a dict of label values to a one-element list (the cell the hot path
adds to) and a histogram is, per label set, its bucket counts (the bucket found with `bisect`
over the bounds) and its sum. `TallyCollector` turns them into prometheus_client metric
families when /metrics is read, so the exposition (names, types, HELP, labels, buckets,
values, and the `_created` series prometheus_client adds to counters and histograms) is what
prometheus_client's own metrics give for the same events.

No lock: every update is made on the gateway's event loop, which is single-threaded, and the
scrape runs on that loop too. A scrape from another thread would still see each histogram
whole (its counts are copied before they are summed, so `_count` is always its `+Inf`
bucket). Anything updated from another thread belongs on a locked prometheus_client metric.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import metrics as prometheus_metrics
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

Labels = tuple[str, ...]


def _use_created() -> bool:
    """Whether prometheus_client exports `_created` series now (its own metrics' switch:
    PROMETHEUS_DISABLE_CREATED_SERIES, or `disable_created_metrics()`), so the tallies do as
    the gateway's other counters do."""
    return bool(getattr(prometheus_metrics, "_use_created", True))


class CounterTally:
    """A counter family: label values to a one-element list holding the count."""

    __slots__ = ("created", "doc", "label_names", "name", "values")

    def __init__(self, name: str, doc: str, label_names: Sequence[str] = ()) -> None:
        self.name, self.doc, self.label_names = name, doc, tuple(label_names)
        self.values: dict[Labels, list[float]] = {}
        self.created: dict[Labels, float] = {}
        if not self.label_names:  # as prometheus_client: an unlabelled counter exists at 0
            self.cell()

    def cell(self, *labels: str) -> list[float]:
        """The cell of one label set (made at 0 the first time): callers keep it and add to
        `cell[0]`."""
        cell = self.values.get(labels)
        if cell is None:  # its time first: a scrape that sees the cell sees its time
            self.created[labels] = time.time()
            cell = self.values[labels] = [0]
        return cell

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.doc, labels=self.label_names)
        created = self.created if _use_created() else None
        for labels, cell in self.values.copy().items():  # (one C call: whole if read off the loop)
            family.add_metric(labels, cell[0], created=None if created is None else created[labels])
        return family


class Buckets:
    """One label set of a histogram: how many observations fell in each bucket (the last is
    +Inf), and their sum."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        """Count `value` in the first bucket whose bound is at least it (prometheus' `le`)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class HistogramTally:
    """A histogram family: label values to `Buckets`."""

    __slots__ = ("bounds", "doc", "label_names", "le", "name", "values")

    def __init__(
        self, name: str, doc: str, label_names: Sequence[str], bounds: Sequence[float]
    ) -> None:
        self.name, self.doc, self.label_names = name, doc, tuple(label_names)
        self.bounds = tuple(float(b) for b in bounds)
        if list(self.bounds) != sorted(self.bounds) or not self.bounds:
            raise ValueError(f"{name}: the bucket bounds must be sorted and not empty")
        # prometheus_client's own spelling of a bound ("+Inf", "1e-05" and so on).
        self.le = tuple(
            str(floatToGoString(b))  # type: ignore[no-untyped-call]
            for b in (*self.bounds, float("inf"))
        )
        self.values: dict[Labels, Buckets] = {}

    def cell(self, *labels: str) -> Buckets:
        """The buckets of one label set (made empty the first time)."""
        cell = self.values.get(labels)
        if cell is None:
            cell = self.values[labels] = Buckets(self.bounds)
        return cell

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.label_names)
        use_created = _use_created()
        for labels, cell in self.values.copy().items():  # (one C call: whole if read off the loop)
            counts, total = cell.counts[:], cell.sum  # one copy: count is its +Inf bucket
            cumulative, acc = [], 0.0
            for le, count in zip(self.le, counts, strict=True):
                acc += count
                cumulative.append((le, acc))
            family.add_metric(labels, cumulative, total)
            if use_created:
                family.add_sample(
                    self.name + "_created",
                    dict(zip(self.label_names, labels, strict=True)),
                    cell.created,
                )
        return family


Tally = CounterTally | HistogramTally


class TallyCollector(Collector):
    """Exports tallies, in the order given, at each scrape."""

    def __init__(self, tallies: Iterable[Tally]) -> None:
        self.tallies = tuple(tallies)

    def collect(self) -> Iterator[Metric]:
        for tally in self.tallies:
            yield tally.family()

    def describe(self) -> Iterator[Metric]:
        """The families without samples: lets the registry refuse a duplicate name."""
        for tally in self.tallies:
            if isinstance(tally, CounterTally):
                yield CounterMetricFamily(tally.name, tally.doc, labels=tally.label_names)
            else:
                yield HistogramMetricFamily(tally.name, tally.doc, labels=tally.label_names)
