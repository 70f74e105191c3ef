"""The Kubernetes and KServe manifests of deploy/: valid against the Kubernetes schemas, and
in agreement with the gateway's own defaults, its routes, the example config.yaml and the
image definitions."""

from __future__ import annotations

import copy
import posixpath
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from gateway.app import create_app
from gateway.cli import CONFIG_ENV
from gateway.config import AdminConfig, Config, ServerConfig, load_config, parse_config
from tests.deploy.manifests import (
    ALERTS,
    GATEWAY_DOCKERFILE,
    IMAGES,
    ROOT,
    VLLM_DOCKERFILE,
    Doc,
    Pod,
    configmap_of,
    documents,
    env_of,
    in_file,
    is_gateway,
    kserve_pod_spec,
    named_ports,
    parse_dockerfile,
    pods,
    prestop_s,
    probe_budget_s,
    probes,
)

K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
"""The oldest Kubernetes the manifests are written for (preStop `sleep` is on by default from
1.30) and the newest the pinned validator knows."""
CORE_KINDS = frozenset(
    {"ConfigMap", "Secret", "Service", "Deployment", "StatefulSet", "PodDisruptionBudget"}
)
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
SECRETS = ROOT / "deploy" / "replicas" / "secrets.example.yaml"

PENDING_KEYS: dict[tuple[str, ...], str] = {
    ("isolation", "shared"): "the shared quarantine (issue 14)",
}
"""Keys the manifests use that a sibling branch adds to the config models. Each is taken out
before validation only while the model lacks the field; once it is merged, the whole config
is validated (and this table can go)."""

POD_IDS = [str(p) for p in pods()]


def _model_has(path: tuple[str, ...]) -> bool:
    model: Any = Config
    for key in path:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return False
        field = model.model_fields.get(key)
        if field is None:
            return False
        model = field.annotation
    return True


def config_data(pod: Pod) -> tuple[dict[str, Any], Config]:
    """The config.yaml a pod's gateway runs: as written, and as the gateway loads it."""
    mount_dir = posixpath.dirname(image_config_path(pod))
    doc, _ = configmap_of(pod, mount_dir)
    text = doc.body["data"][posixpath.basename(image_config_path(pod))]
    data = yaml.safe_load(text)
    checked = copy.deepcopy(data)
    for path in PENDING_KEYS:
        if not _model_has(path):
            parent = checked
            for key in path[:-1]:
                parent = parent.get(key, {})
            parent.pop(path[-1], None)
    return data, parse_config(checked, str(doc))


def image_config_path(pod: Pod) -> str:
    """Where the pod's gateway reads its config: the container's VLLM_GUARD_CONFIG or
    --config when it sets one, else the image's VLLM_GUARD_CONFIG."""
    gateway = pod.gateway
    env = env_of(gateway)
    if CONFIG_ENV in env:
        return str(env[CONFIG_ENV]["value"])
    args = [*gateway.get("command", []), *gateway.get("args", [])]
    if "--config" in args:
        return str(args[args.index("--config") + 1])
    dockerfile = VLLM_DOCKERFILE if "vllm-guard-vllm:" in gateway["image"] else GATEWAY_DOCKERFILE
    return parse_dockerfile(dockerfile).final.env()[CONFIG_ENV]


def supervised(config: Config) -> bool:
    return config.engine.command is not None


def loopback_ports(config: Config) -> set[int]:
    """Ports that listen on the pod's loopback only: the engine's (per engine.url), and the
    admin listener's when bound to loopback."""
    ports = set()
    url = urlsplit(config.engine.url)
    if url.hostname in LOOPBACK_HOSTS and url.port is not None:
        ports.add(url.port)
    if config.admin.enabled and config.admin.host in LOOPBACK_HOSTS:
        ports.add(config.admin.port)
    return ports


def resolve_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    ports = named_ports(container)
    assert port in ports, f"port {port!r} is not a named port of container {container['name']}"
    return ports[port]


def gateway_routes() -> set[str]:
    app = create_app(Config())
    return {r.resource.canonical for r in app.router.routes() if r.resource is not None}


def validate_core(body: dict[str, Any]) -> None:
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(body, version, strict=True)


def as_pod(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- every manifest is valid --------------------------------------------------------------------


@pytest.mark.parametrize("doc", documents(), ids=str)
def test_every_manifest_validates(doc: Doc) -> None:
    """Each document under deploy/ is valid: core kinds against the Kubernetes schemas (strict:
    an unknown or misspelt field fails), KServe's predictor as a PodSpec, the monitoring
    resources by what they must select; a kind with no check fails."""
    body = doc.body
    if doc.kind in CORE_KINDS:
        validate_core(body)
    elif doc.kind == "InferenceService":
        assert body["apiVersion"] == "serving.kserve.io/v1beta1"
        assert set(body["spec"]) == {"predictor"}
        predictor = body["spec"]["predictor"]
        validate_core(as_pod(doc.name, kserve_pod_spec(predictor)))
    elif doc.kind == "ServiceMonitor":
        selector = body["spec"]["selector"]["matchLabels"]
        services = [
            d
            for d in documents()
            if d.kind == "Service" and _selects(selector, d.body["metadata"]["labels"])
        ]
        assert services, f"{doc}: selects no Service"
        for endpoint in body["spec"]["endpoints"]:
            for service in services:
                names = {p.get("name") for p in service.body["spec"]["ports"]}
                assert endpoint["port"] in names, f"{doc}: {service} has no port {endpoint['port']}"
    elif doc.kind == "PodMonitor":
        selector = body["spec"]["selector"]["matchLabels"]
        selected = [p for p in pods() if _selects(selector, p.labels)]
        assert selected, f"{doc}: selects no pod"
        for endpoint in body["spec"]["podMetricsEndpoints"]:
            for pod in selected:
                assert endpoint["port"] in named_ports(pod.gateway), f"{doc}: {pod}"
                assert endpoint["path"] == "/metrics"
    elif doc.kind == "PrometheusRule":
        rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
        assert body["spec"] == rules, "prometheusrule.yaml's groups differ from alerts.yaml's"
    else:
        pytest.fail(f"{doc}: no check for kind {doc.kind}")


@pytest.mark.parametrize(
    ("where", "change"),
    [
        ("probe field misspelt", lambda c: c["readinessProbe"].update(perdiodSeconds=2)),
        ("port of the wrong type", lambda c: c["ports"][0].update(containerPort="http")),
        ("unknown container field", lambda c: c.update(livenesProbe={})),
    ],
)
def test_the_validator_refuses_a_broken_pod(where: str, change: Any) -> None:
    """The validation above can fail: the sidecar pod with one mistake is refused."""
    doc = next(d for d in documents() if d.kind == "Deployment" and "sidecar" in d.name)
    broken = copy.deepcopy(doc.body)
    gateway = next(c for c in broken["spec"]["template"]["spec"]["containers"] if is_gateway(c))
    change(gateway)
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(broken)


def test_every_shape_is_there() -> None:
    """deploy/ has the three shapes: a sidecar Deployment and KServe InferenceService, a single
    container, many replicas (and the monitoring resources)."""
    kinds = {(d.path.parent.name, d.kind) for d in documents()}
    assert {
        ("sidecar", "Deployment"),
        ("sidecar", "InferenceService"),
        ("single", "Deployment"),
        ("replicas", "Deployment"),
        ("replicas", "StatefulSet"),
        ("replicas", "PodDisruptionBudget"),
        ("monitoring", "ServiceMonitor"),
        ("monitoring", "PrometheusRule"),
    } <= kinds


# --- the config each pod runs ---------------------------------------------------------------------


@pytest.mark.parametrize("pod", pods(), ids=POD_IDS)
def test_the_configmap_is_a_valid_config(pod: Pod) -> None:
    """The config.yaml each pod's ConfigMap holds loads as the gateway loads it."""
    _, config = config_data(pod)
    assert config.server.port > 0


@pytest.mark.parametrize("path", sorted(IMAGES.glob("config.*.yaml")), ids=lambda p: p.name)
def test_the_images_baked_configs_are_valid(path: Path) -> None:
    """The configs baked into the images load."""
    load_config(path)


@pytest.mark.parametrize("pod", pods(), ids=POD_IDS)
def test_listeners_and_drain_agree_with_the_defaults_and_the_example(pod: Pod) -> None:
    """The ports and the drain the manifests are built around are the gateway's own defaults
    and the example config.yaml's, so that the probes, Services and grace periods below are
    checked against what the gateway really does."""
    _, config = config_data(pod)
    example = load_config(ROOT / "config.yaml")
    defaults = {
        "server.port": ServerConfig.model_fields["port"].default,
        "server.shutdown_grace_s": ServerConfig.model_fields["shutdown_grace_s"].default,
        "admin.port": AdminConfig.model_fields["port"].default,
    }
    found = {
        "server.port": config.server.port,
        "server.shutdown_grace_s": config.server.shutdown_grace_s,
        "admin.port": config.admin.port,
    }
    in_example = {
        "server.port": example.server.port,
        "server.shutdown_grace_s": example.server.shutdown_grace_s,
        "admin.port": example.admin.port,
    }
    assert found == defaults == in_example


@pytest.mark.parametrize("pod", pods(), ids=POD_IDS)
def test_the_config_is_mounted_as_a_directory_where_the_image_reads_it(pod: Pod) -> None:
    """The gateway reads its config from a ConfigMap mounted as a directory at the path the
    image's VLLM_GUARD_CONFIG names (never subPath: a subPath mount never sees the kubelet's
    symlink swap, so live reload would not happen)."""
    path = image_config_path(pod)
    doc, name = configmap_of(pod, posixpath.dirname(path))
    assert posixpath.basename(path) in doc.body["data"]
    for container in pod.spec["containers"]:
        for mount in container.get("volumeMounts", []):
            assert not {"subPath", "subPathExpr"} & set(mount), f"{pod}: {mount}"
    volume = next(v for v in pod.spec["volumes"] if v.get("configMap", {}).get("name") == name)
    assert "items" not in volume["configMap"]


# --- probes, ports, Services ------------------------------------------------------------------


@pytest.mark.parametrize("pod", pods(), ids=POD_IDS)
def test_no_http_probe_targets_a_loopback_only_port(pod: Pod) -> None:
    """A kubelet's HTTP or TCP probe connects to the pod's address, never to a container's
    loopback: none may target the engine's port or a loopback admin port."""
    _, config = config_data(pod)
    loopback = loopback_ports(config)
    assert loopback, f"{pod}: the engine is expected on loopback"
    for container in pod.spec["containers"]:
        for kind, probe in probes(container):
            for action in ("httpGet", "tcpSocket", "grpc"):
                if action in probe:
                    port = resolve_port(container, probe[action]["port"])
                    assert port not in loopback, f"{pod}: {container['name']} {kind} on {port}"


@pytest.mark.parametrize("pod", pods(), ids=POD_IDS)
def test_probes_use_the_gateways_paths_and_port(pod: Pod) -> None:
    """readiness on /ready, liveness and startup on /health, the engine's liveness on
    /engine/live: on the gateway's client port, and all of them real routes of the app."""
    _, config = config_data(pod)
    routes = gateway_routes()
    gateway = pod.gateway
    expected = {"readinessProbe": "/ready", "livenessProbe": "/health", "startupProbe": "/health"}
    assert {k for k, _ in probes(gateway)} == set(expected)
    for kind, probe in probes(gateway):
        assert probe["httpGet"]["path"] == expected[kind]
        assert resolve_port(gateway, probe["httpGet"]["port"]) == config.server.port
    engine = pod.engine
    if engine is not None:
        live = engine["livenessProbe"]["httpGet"]
        assert live["path"] == "/engine/live"
        assert live["port"] == config.server.port  # by number: another container's port
        assert "httpGet" not in engine["startupProbe"]
        assert "exec" in engine["startupProbe"]
    used = {
        p["httpGet"]["path"] for c in pod.spec["containers"] for _, p in probes(c) if "httpGet" in p
    }
    assert used <= routes, f"not routes of the gateway: {used - routes}"


@pytest.mark.parametrize("pod", pods(), ids=POD_IDS)
def test_the_engine_listens_on_loopback_where_the_config_looks(pod: Pod) -> None:
    """The engine binds the host and port of engine.url: its container's args in the sidecar
    shape, engine.command in the single-container shape."""
    _, config = config_data(pod)
    url = urlsplit(config.engine.url)
    argv = list(config.engine.command or []) if supervised(config) else []
    engine = pod.engine
    if engine is not None:
        assert not supervised(config), f"{pod}: an engine container and engine.command"
        argv = [*engine.get("command", []), *engine.get("args", [])]
        assert not engine.get("ports"), "the engine's port is not the pod's to expose"
    assert argv[argv.index("--host") + 1] == url.hostname
    assert int(argv[argv.index("--port") + 1]) == url.port
    assert url.hostname in LOOPBACK_HOSTS


@pytest.mark.parametrize("pod", pods(), ids=POD_IDS)
def test_clients_reach_only_the_gateway_port(pod: Pod) -> None:
    """The Services in front of a pod target the gateway's client port and nothing else; the
    gateway listens on it on every address (server.host)."""
    _, config = config_data(pod)
    assert config.server.host in {"0.0.0.0", "::", ""}
    assert config.server.port in named_ports(pod.gateway).values()
    services = [
        d
        for d in in_file(pod.doc.path, "Service")
        if _selects(d.body["spec"]["selector"], pod.labels)
    ]
    if pod.doc.kind == "InferenceService":
        assert not services  # KServe makes its own, to the kserve-container
        assert pod.spec["containers"][0]["name"] == "kserve-container"
        assert is_gateway(pod.spec["containers"][0])
        return
    assert services, f"{pod}: no Service"
    for service in services:
        for port in service.body["spec"]["ports"]:
            assert resolve_port(pod.gateway, port["targetPort"]) == config.server.port


# --- timing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("pod", pods(), ids=POD_IDS)
def test_the_grace_period_outlasts_the_drain(pod: Pod) -> None:
    """terminationGracePeriodSeconds is longer than the gateway's preStop pause, its drain
    (server.shutdown_grace_s) and, when it supervises the engine, the engine's stop
    (engine.stop_grace_s); in the sidecar shape the engine's preStop waits for the drain."""
    _, config = config_data(pod)
    grace = pod.spec["terminationGracePeriodSeconds"]
    pause = prestop_s(pod.gateway)
    drain = pause + config.server.shutdown_grace_s
    needed = drain + (config.engine.stop_grace_s if supervised(config) else 0)
    assert grace > needed, f"{pod}: {grace} s <= {needed} s"
    engine = pod.engine
    if engine is not None:
        wait = float(env_of(engine)["GATEWAY_DRAIN_WAIT_S"]["value"])
        script = engine["lifecycle"]["preStop"]["exec"]["command"][-1]
        assert "GATEWAY_DRAIN_WAIT_S" in script
        assert str(config.server.port) in script
        assert drain <= wait < grace, f"{pod}: the engine waits {wait} s"


@pytest.mark.parametrize("pod", pods(), ids=POD_IDS)
def test_the_startup_probe_covers_a_model_load(pod: Pod) -> None:
    """The probe that covers the engine's start (the engine container's in the sidecar shape,
    the gateway's in the single container) allows at least engine.startup_timeout_s."""
    _, config = config_data(pod)
    container = pod.engine if pod.engine is not None else pod.gateway
    budget = probe_budget_s(container["startupProbe"])
    assert budget >= config.engine.startup_timeout_s, f"{pod}: {budget} s"


# --- resources, secrets, tokenizers, scraping ---------------------------------------------------


@pytest.mark.parametrize("pod", pods(), ids=POD_IDS)
def test_every_container_requests_resources(pod: Pod) -> None:
    """Each container states its CPU and memory requests (and the engine its GPU)."""
    for container in pod.spec["containers"]:
        requests = container.get("resources", {}).get("requests", {})
        assert {"cpu", "memory"} <= set(requests), f"{pod}: {container['name']}"
    engine = pod.engine if pod.engine is not None else pod.gateway
    assert "nvidia.com/gpu" in engine["resources"]["requests"]


def _secret_keys() -> dict[str, set[str]]:
    docs = [d for d in documents() if d.kind == "Secret"]
    return {d.name: set(d.body.get("stringData", {})) | set(d.body.get("data", {})) for d in docs}


@pytest.mark.parametrize("pod", pods(), ids=POD_IDS)
def test_credentials_come_from_secrets(pod: Pod) -> None:
    """An admin listener off loopback gets its bearer token (admin.token_env) from a Secret,
    the shared quarantine its Redis password (password_env) too; every secretKeyRef names a
    Secret and key of deploy/replicas/secrets.example.yaml."""
    data, config = config_data(pod)
    env = env_of(pod.gateway)
    wanted = []
    if config.admin.enabled and config.admin.host not in LOOPBACK_HOSTS:
        token_env = getattr(config.admin, "token_env", "VLLM_GUARD_ADMIN_TOKEN")
        wanted.append(token_env)
    shared = data.get("isolation", {}).get("shared")
    if shared is not None:
        wanted.append(shared.get("password_env", "VLLM_GUARD_REDIS_PASSWORD"))
        assert "password" not in str(shared["url"]).split("@")[0].split("//")[-1]
    for name in wanted:
        assert name in env, f"{pod}: {name} is not set"
        assert "secretKeyRef" in env[name].get("valueFrom", {}), f"{pod}: {name} not from a Secret"
    secrets = _secret_keys()
    for container in pod.spec["containers"]:
        for entry in container.get("env", []):
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref is not None:
                assert ref["key"] in secrets.get(ref["name"], set()), f"{pod}: {ref}"


@pytest.mark.parametrize("pod", pods(), ids=POD_IDS)
def test_tokenizer_files_are_mounted_into_the_gateway(pod: Pod) -> None:
    """Every tokenizer folder the config names is on a volume mounted into the gateway's
    container, the same volume the engine loads the model from: counts stay local."""
    _, config = config_data(pod)
    folders = [p.tokenizer for p in config.models.values() if p.tokenizer]
    assert folders, f"{pod}: no tokenizer folder configured"
    mounts = {m["mountPath"]: m["name"] for m in pod.gateway["volumeMounts"]}
    engine_mounts = {m["name"] for m in (pod.engine or {}).get("volumeMounts", [])}
    model = (pod.engine or {}).get("args") or list(config.engine.command or [])
    for folder in folders:
        under = [name for path, name in mounts.items() if folder.startswith(path.rstrip("/") + "/")]
        assert under, f"{pod}: {folder} is not mounted into the gateway"
        assert folder in model, f"{pod}: the engine does not load {folder}"
        if pod.engine is not None:
            assert under[0] in engine_mounts, f"{pod}: the engine has not the same volume"


@pytest.mark.parametrize("pod", pods(), ids=POD_IDS)
def test_prometheus_scrapes_the_gateway(pod: Pod) -> None:
    """The pod carries the prometheus.io annotations for the gateway's /metrics on its client
    port, and a ServiceMonitor (or, for KServe, a PodMonitor) selects it."""
    _, config = config_data(pod)
    assert pod.annotations.get("prometheus.io/scrape") == "true"
    assert pod.annotations.get("prometheus.io/port") == str(config.server.port)
    assert pod.annotations.get("prometheus.io/path") == "/metrics"
    monitors = [d for d in documents() if d.kind in {"ServiceMonitor", "PodMonitor"}]
    selected = []
    for monitor in monitors:
        selector = monitor.body["spec"]["selector"]["matchLabels"]
        if monitor.kind == "PodMonitor" and _selects(selector, pod.labels):
            selected.append(monitor)
        if monitor.kind == "ServiceMonitor":
            selected.extend(
                monitor
                for service in in_file(pod.doc.path, "Service")
                if _selects(selector, service.body["metadata"]["labels"])
                and _selects(service.body["spec"]["selector"], pod.labels)
            )
    assert selected, f"{pod}: no ServiceMonitor or PodMonitor selects it"


# --- the shapes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("pod", pods(), ids=POD_IDS)
def test_each_shape_runs_its_engine_its_way(pod: Pod) -> None:
    """Sidecar: an engine container and no engine.command. Single container: engine.command
    run from the vLLM image's own Python (not the gateway's virtual environment)."""
    _, config = config_data(pod)
    if pod.doc.path.parent.name == "single":
        assert pod.engine is None
        assert supervised(config)
        assert "vllm-guard-vllm:" in pod.gateway["image"]
        assert not str((config.engine.command or [""])[0]).startswith("/opt/vllm-guard")
    else:
        assert pod.engine is not None
        assert not supervised(config)


def test_many_replicas_share_a_quarantine_and_a_disruption_budget() -> None:
    """The many-replica shape runs several pods with isolation.shared pointing at the Redis
    Service of redis.yaml, and a PodDisruptionBudget that selects them."""
    [pod] = [p for p in pods() if p.doc.path.parent.name == "replicas"]
    assert pod.doc.body["spec"]["replicas"] > 1
    data, _ = config_data(pod)
    url = urlsplit(data["isolation"]["shared"]["url"])
    redis = [d.name for d in in_file(pod.doc.path.parent / "redis.yaml", "Service")]
    assert url.hostname in redis
    [budget] = in_file(pod.doc.path, "PodDisruptionBudget")
    assert _selects(budget.body["spec"]["selector"]["matchLabels"], pod.labels)
