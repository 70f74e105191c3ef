"""Reading deploy/: the manifests as documents, each shape's pod and config, the image
definitions. Pure helpers (files in, data out), shared by the tests of tests/deploy/."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MONITORING = DEPLOY / "monitoring"
IMAGES = DEPLOY / "images"
GATEWAY_DOCKERFILE = IMAGES / "gateway.Dockerfile"
VLLM_DOCKERFILE = IMAGES / "vllm.Dockerfile"
ALERTS = MONITORING / "alerts.yaml"
ALERT_TESTS = MONITORING / "alerts.test.yaml"
PROMETHEUS_RULE = MONITORING / "prometheusrule.yaml"
DASHBOARD = MONITORING / "dashboard.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"

NOT_MANIFESTS = frozenset({ALERTS, ALERT_TESTS})
"""YAML under deploy/ that is Prometheus's, not Kubernetes's (and deploy/images/ holds the
configs baked into the images)."""

GATEWAY_IMAGES = ("/vllm-guard:", "/vllm-guard-vllm:")
"""How a container running the gateway is recognised: by its image's name."""
ENGINE_IMAGE = "vllm/vllm-openai:"


@dataclass(frozen=True)
class Doc:
    path: Path
    index: int
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body["kind"])

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}#{self.index} {self.kind}/{self.name}"


def manifest_files() -> list[Path]:
    return sorted(
        p for p in DEPLOY.rglob("*.yaml") if p not in NOT_MANIFESTS and IMAGES not in p.parents
    )


@cache
def documents() -> tuple[Doc, ...]:
    docs = []
    for path in manifest_files():
        for i, body in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            if body is None:
                continue
            docs.append(Doc(path, i, body))
    return tuple(docs)


def in_file(path: Path, kind: str) -> list[Doc]:
    return [d for d in documents() if d.path == path and d.kind == kind]


# --- pods -------------------------------------------------------------------------------------

KSERVE_COMPONENT_FIELDS = frozenset(
    {
        "minReplicas",
        "maxReplicas",
        "scaleTarget",
        "scaleMetric",
        "scaleMetricType",
        "containerConcurrency",
        "timeout",
        "canaryTrafficPercent",
        "labels",
        "annotations",
        "logger",
        "batcher",
        "deploymentStrategy",
        "autoScaling",
        "workerSpec",
        "model",
    }
)
"""KServe's own fields of a predictor (ComponentExtensionSpec and friends); the rest of a
custom predictor is a Kubernetes PodSpec, validated as one."""


def is_gateway(container: dict[str, Any]) -> bool:
    return any(mark in container["image"] for mark in GATEWAY_IMAGES)


@dataclass(frozen=True)
class Pod:
    """A pod template of a workload, with where it came from."""

    doc: Doc
    spec: dict[str, Any]
    labels: dict[str, str]
    annotations: dict[str, str]

    def __str__(self) -> str:
        return str(self.doc)

    @property
    def gateway(self) -> dict[str, Any]:
        found: list[dict[str, Any]] = [c for c in self.spec["containers"] if is_gateway(c)]
        assert len(found) == 1, f"{self}: one gateway container expected"
        return found[0]

    @property
    def engine(self) -> dict[str, Any] | None:
        found = [c for c in self.spec["containers"] if c["image"].startswith(ENGINE_IMAGE)]
        assert len(found) <= 1, f"{self}: at most one engine container expected"
        return found[0] if found else None

    def volume(self, name: str) -> dict[str, Any]:
        return next(v for v in self.spec.get("volumes", []) if v["name"] == name)


def pods() -> list[Pod]:
    """Every pod template under deploy/ that runs the gateway."""
    out = []
    for doc in documents():
        if doc.kind in {"Deployment", "StatefulSet"}:
            template = doc.body["spec"]["template"]
            meta = template.get("metadata", {})
            pod = Pod(doc, template["spec"], meta.get("labels", {}), meta.get("annotations", {}))
        elif doc.kind == "InferenceService":
            predictor = doc.body["spec"]["predictor"]
            pod = Pod(
                doc,
                kserve_pod_spec(predictor),
                predictor.get("labels", {}),
                predictor.get("annotations", {}),
            )
        else:
            continue
        if any(is_gateway(c) for c in pod.spec["containers"]):
            out.append(pod)
    return out


def kserve_pod_spec(predictor: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in predictor.items() if k not in KSERVE_COMPONENT_FIELDS}


# --- the config a pod runs --------------------------------------------------------------------


def configmap_of(pod: Pod, mount_dir: str) -> tuple[Doc, str]:
    """The ConfigMap mounted at `mount_dir` in the gateway's container (from the same file)."""
    mount = next(m for m in pod.gateway.get("volumeMounts", []) if m["mountPath"] == mount_dir)
    volume = pod.volume(mount["name"])
    name = volume["configMap"]["name"]
    docs = [d for d in in_file(pod.doc.path, "ConfigMap") if d.name == name]
    assert docs, f"{pod}: ConfigMap {name} is not in {pod.doc.path.name}"
    return docs[0], name


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def named_ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}


def probes(container: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        if kind in container:
            yield kind, container[kind]


def probe_budget_s(probe: dict[str, Any]) -> int:
    """How long a startup probe lets a container start before the kubelet kills it."""
    return int(probe.get("initialDelaySeconds", 0)) + int(probe.get("periodSeconds", 10)) * int(
        probe.get("failureThreshold", 3)
    )


def prestop_s(container: dict[str, Any]) -> int:
    """The seconds a container's preStop sleep takes (0 without one)."""
    pre = container.get("lifecycle", {}).get("preStop", {})
    return int(pre.get("sleep", {}).get("seconds", 0))


# --- image definitions ------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]

    def last(self, op: str) -> str:
        found = self.all(op)
        assert found, f"no {op} in the stage FROM {self.base}"
        return found[-1]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for arg in self.all("ENV"):
            for word in shlex.split(arg):
                key, _, value = word.partition("=")
                out[key] = value
        return out

    def exec_form(self, op: str) -> list[str]:
        value = json.loads(self.last(op))
        assert isinstance(value, list), f"{op} must be in exec (JSON) form"
        return [str(v) for v in value]


@dataclass
class Dockerfile:
    args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions (continuations joined, comments dropped) grouped by stage; ARG defaults
    before the first FROM substituted into FROM lines."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(
            line
            for line in path.read_text(encoding="utf-8").splitlines()
            if not line.lstrip().startswith("#")
        ),
    )
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        op, _, rest = line.strip().partition(" ")
        op, rest = op.upper(), rest.strip()
        if op == "ARG" and not stages:
            key, _, value = rest.partition("=")
            args[key] = value
        elif op == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        else:
            assert stages, f"{path}: {op} before FROM"
            stages[-1].instructions.append((op, rest))
    return Dockerfile(args, stages)


# --- the monitoring files -------------------------------------------------------------------


def rules() -> list[dict[str, Any]]:
    """The alerting rules of alerts.yaml, all groups."""
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def panels() -> list[dict[str, Any]]:
    """The dashboard's panels, rows left out (and panels inside collapsed rows included)."""
    out = []
    for panel in dashboard()["panels"]:
        out.extend(panel.get("panels", []))
        if panel["type"] != "row":
            out.append(panel)
    return out


def named_expressions() -> list[tuple[str, str]]:
    """Every PromQL expression of the rules and the dashboard, with where it is."""
    items = [(f"alert {r['alert']}", str(r["expr"])) for r in rules()]
    items += [(f"panel {p['title']}", str(t["expr"])) for p in panels() for t in p["targets"]]
    variables = dashboard()["templating"]["list"]
    items += [
        (f"variable {v['name']}", str(v["definition"])) for v in variables if v["type"] == "query"
    ]
    return items


# --- the metric reference ---------------------------------------------------------------------


@dataclass(frozen=True)
class MetricDoc:
    name: str
    type: str
    labels: dict[str, frozenset[str] | None]
    """Label name to its closed set of values, or None where the set is not listed."""


_CLOSED = re.compile(r"^[A-Za-z0-9_]+(, [A-Za-z0-9_]+)*$")


@cache
def metric_catalogue() -> dict[str, MetricDoc]:
    """docs/metrics.md's table: name, type, labels (with their values where listed)."""
    out = {}
    for line in METRICS_DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("vllm_guard_"):
            continue
        name, mtype, labels_cell, _ = cells
        labels: dict[str, frozenset[str] | None] = {}
        if labels_cell not in {"—", "-", ""}:
            for m in re.finditer(r"([a-z_]+)(?: \(([^)]*)\))?(?:, |$)", labels_cell):
                values = m.group(2)
                closed = values is not None and _CLOSED.match(values)
                labels[m.group(1)] = frozenset(values.split(", ")) if closed else None
        out[name] = MetricDoc(name, mtype, labels)
    return out
