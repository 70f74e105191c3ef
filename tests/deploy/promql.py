"""What a PromQL expression names: metrics, label matchers, grouping labels. A small reader
for the expressions of deploy/monitoring/, checked against docs/metrics.md; their syntax is
Prometheus's own to check (promtool)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tests.deploy.manifests import MetricDoc

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
TARGET_LABELS = frozenset({"namespace", "pod", "instance", "job", "container", "service"})
"""Labels the scrape adds to every series (Kubernetes service discovery), not the gateway."""

GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}

_METRIC = re.compile(r"\b(vllm_guard_[a-z0-9_]+)\b(\{[^}]*\})?")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


@dataclass(frozen=True)
class Matcher:
    metric: str
    label: str
    op: str
    value: str


def metric_names(expr: str) -> list[str]:
    return [m.group(1) for m in _METRIC.finditer(expr)]


def matchers(expr: str) -> list[Matcher]:
    out = []
    for m in _METRIC.finditer(expr):
        if m.group(2):
            for label, op, value in _MATCHER.findall(m.group(2)):
                out.append(Matcher(m.group(1), label, op, value))
    return out


def grouping_labels(expr: str) -> list[str]:
    return [
        label.strip() for g in _GROUPING.findall(expr) for label in g.split(",") if label.strip()
    ]


def for_promtool(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced, so Prometheus can parse it."""
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    return re.sub(r"\$\{?[A-Za-z_]+\}?", ".*", expr)


def base_metric(name: str, catalogue: dict[str, MetricDoc]) -> MetricDoc | None:
    """The documented metric a series name belongs to (a histogram's _bucket is its)."""
    if name in catalogue:
        return catalogue[name]
    for suffix in HISTOGRAM_SUFFIXES:
        base = catalogue.get(name.removesuffix(suffix))
        if name.endswith(suffix) and base is not None and base.type == "histogram":
            return base
    return None


def problems(expr: str, catalogue: dict[str, MetricDoc]) -> list[str]:
    """Every metric, label and label value the expression names that docs/metrics.md lacks."""
    found = []
    names = metric_names(expr)
    if not names:
        found.append(f"names no vllm_guard_ metric: {expr}")
    docs = {}
    for name in names:
        doc = base_metric(name, catalogue)
        if doc is None:
            found.append(f"{name} is not in docs/metrics.md")
        else:
            docs[name] = doc
    for m in matchers(expr):
        doc = docs.get(m.metric)
        if doc is None or m.label in TARGET_LABELS:
            continue
        if m.label == "le" and m.metric.endswith("_bucket"):
            continue
        if m.label not in doc.labels:
            found.append(f"{m.metric} has no label {m.label}")
            continue
        values = doc.labels[m.label]
        if values is None or "$" in m.value:
            continue
        if m.op in {"=", "!="} and m.value not in values:
            found.append(f"{m.metric}{{{m.label}}} has no value {m.value!r}")
        if m.op in {"=~", "!~"} and not any(re.fullmatch(m.value, v) for v in values):
            found.append(f"{m.metric}{{{m.label}=~{m.value!r}}} matches none of {sorted(values)}")
    known = set(TARGET_LABELS) | {"le"}
    for doc in docs.values():
        known |= set(doc.labels)
    found.extend(
        f"groups by {label}, a label none of {sorted(docs)} has"
        for label in grouping_labels(expr)
        if label not in known
    )
    return found
