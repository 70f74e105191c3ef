"""The dashboard and the alerting rules of deploy/monitoring/: Prometheus's own promtool
parses them (and runs the rules' unit tests), and every metric, label and label value they
name is in the project's metric reference, docs/metrics.md."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.manifests import (
    ALERT_TESTS,
    ALERTS,
    PROMETHEUS_RULE,
    dashboard,
    metric_catalogue,
    named_expressions,
    panels,
    rules,
)
from tests.deploy.promql import for_promtool, problems


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: run scripts/install-system.sh (Debian's prometheus)"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, check=False)


def test_the_alerting_rules_pass_promtool(tmp_path: Path) -> None:
    """alerts.yaml and the PrometheusRule's groups are rules files Prometheus accepts."""
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    spec = yaml.safe_load(PROMETHEUS_RULE.read_text(encoding="utf-8"))["spec"]
    extracted = tmp_path / "prometheusrule.rules.yaml"
    extracted.write_text(yaml.safe_dump(spec), encoding="utf-8")
    result = promtool("check", "rules", str(extracted))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_the_alerting_rules_unit_tests_pass() -> None:
    """alerts.test.yaml (promtool test rules): the given-up, restart, quarantine, reload,
    5xx and Redis alerts fire on the series that mean it and stay quiet otherwise."""
    result = promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_refuses_a_broken_rule(tmp_path: Path) -> None:
    """The check above can fail: a rule with a syntax error is refused."""
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        yaml.safe_dump({"groups": [{"name": "x", "rules": [{"alert": "A", "expr": "sum by (("}]}]}),
        encoding="utf-8",
    )
    assert promtool("check", "rules", str(broken)).returncode != 0


def test_every_alert_says_what_and_how_bad() -> None:
    """Each alert has a severity, a summary naming the pod, and a description."""
    for rule in rules():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert "$labels.pod" in rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]


def test_the_dashboards_expressions_parse(tmp_path: Path) -> None:
    """Every dashboard query, with Grafana's variables filled in, is PromQL that Prometheus
    parses (checked as recording rules by promtool)."""
    exprs = [t["expr"] for p in panels() for t in p["targets"]]
    assert exprs
    group = {
        "name": "dashboard",
        "rules": [
            {"record": f"dashboard:q{i}", "expr": for_promtool(e)} for i, e in enumerate(exprs)
        ],
    }
    path = tmp_path / "dashboard.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [group]}), encoding="utf-8")
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("where", "expr"), named_expressions(), ids=[w for w, _ in named_expressions()]
)
def test_every_metric_named_is_in_the_reference(where: str, expr: str) -> None:
    """The metrics, labels and closed label values each query and rule names are the ones
    docs/metrics.md lists (a histogram's _bucket/_sum/_count included)."""
    assert problems(expr, metric_catalogue()) == []


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("rate(vllm_guard_request_total[5m])", "vllm_guard_request_total is not in"),
        ('vllm_guard_engine_state{state="dead"}', "has no value 'dead'"),
        ('vllm_guard_shed_total{reason="x"}', "has no label reason"),
        ("sum by (cause) (vllm_guard_in_flight)", "groups by cause"),
        ("vllm_guard_in_flight_bucket", "vllm_guard_in_flight_bucket is not in"),
    ],
)
def test_the_reference_check_can_fail(expr: str, problem: str) -> None:
    """A misspelt metric, an unknown label value or label, a grouping label no metric has,
    or a histogram suffix on a gauge is reported."""
    assert any(problem in p for p in problems(expr, metric_catalogue()))


def test_the_dashboard_covers_what_an_operator_reads() -> None:
    """Rows for traffic and outcomes, policy actions, time added, engine, quarantine; every
    panel's data source is the dashboard's Prometheus variable."""
    rows = [p["title"].lower() for p in dashboard()["panels"] if p["type"] == "row"]
    for topic in ("traffic", "policy", "time added", "engine", "quarantine"):
        assert any(topic in row for row in rows), topic
    for panel in panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_the_reference_lists_the_metrics() -> None:
    """docs/metrics.md's table is read whole: every metric has a type, and the closed label
    sets the checks use are there."""
    catalogue = metric_catalogue()
    assert len(catalogue) >= 25
    assert {m.type for m in catalogue.values()} <= {"counter", "gauge", "histogram"}
    assert catalogue["vllm_guard_engine_state"].labels["state"] == frozenset(
        {"starting", "ready", "failed", "restarting", "given_up"}
    )
