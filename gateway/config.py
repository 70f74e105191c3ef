"""config.yaml, loaded into frozen pydantic models.

A loaded `Config` is an immutable snapshot: everything the hot path needs (the resolved policy
of each model, the set of relayed paths) is computed once here, at load time. A later live
reload swaps the whole snapshot atomically (`ConfigHolder`); nothing mutates one in place.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from engine.settings import EngineConfig

GENERATION_PATHS: tuple[str, ...] = ("/v1/chat/completions", "/v1/completions")
"""Paths that generate: always behind admission, never configurable away from it."""

DEFAULT_RELAY_PATHS: tuple[str, ...] = (
    "GET /v1/models",
    "POST /tokenize",
    "POST /detokenize",
    "GET /version",
    "POST /v1/embeddings",
)
"""Read-only engine paths relayed as they are, unless config.yaml lists others."""

KSERVE_PREFIX = "/openai"

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServerConfig(_Frozen):
    """The client-facing listener."""

    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: PositiveInt = 4 * 1024 * 1024
    relay_paths: tuple[str, ...] = DEFAULT_RELAY_PATHS
    """Non-generating engine paths relayed unchanged, as "METHOD /path". Closed by default:
    any path not here (and not a generation path) is answered 404 by the gateway."""
    shutdown_grace_s: PositiveFloat = 20.0
    """On SIGTERM, how long in-flight requests may take to finish before they are cut."""

    @cached_property
    def relay_set(self) -> frozenset[str]:
        return frozenset(self.relay_paths)

    @model_validator(mode="after")
    def _check_relay_paths(self) -> Self:
        for entry in self.relay_paths:
            method, _, path = entry.partition(" ")
            if method not in {"GET", "POST"} or not path.startswith("/"):
                raise ValueError(f"relay_paths entry {entry!r} must look like 'GET /path'")
            if path in GENERATION_PATHS:
                raise ValueError(
                    f"relay_paths entry {entry!r}: generation paths always pass "
                    "admission and cannot be relayed unchanged"
                )
        return self


class AdminConfig(_Frozen):
    """The operator's listener (effective configuration, quarantine, engine state, restart,
    reload). Loopback by default; never the client port."""

    host: str = "127.0.0.1"
    port: int = Field(8081, ge=0, le=65535)
    enabled: bool = True
    token_env: str = Field("VLLM_GUARD_ADMIN_TOKEN", min_length=1)
    """The environment variable holding the bearer token the admin listener requires when
    it is bound to anything but loopback (127.0.0.0/8, ::1); it refuses to start without."""


class MetricsListener(StrEnum):
    CLIENT = "client"
    ADMIN = "admin"


class MetricsConfig(_Frozen):
    """GET /metrics (the gateway's own, Prometheus text) and GET /engine/metrics (the engine's,
    relayed), on the client port by default; fixed at start."""

    enabled: bool = True
    listener: MetricsListener = MetricsListener.CLIENT
    """client (as vLLM serves its own) or admin (needs the admin listener enabled)."""


class OnExceed(StrEnum):
    CLAMP = "clamp"
    REJECT = "reject"


class PolicyMode(StrEnum):
    ENFORCE = "enforce"
    REPORT = "report"


class TokenSource(StrEnum):
    AUTO = "auto"
    """Local tokenizer files when readable, else the engine's /tokenize."""
    LOCAL = "local"
    ENGINE = "engine"


class PolicyOverride(_Frozen):
    """A policy as written in YAML: every field optional; a model entry overrides the defaults
    field by field."""

    default_max_tokens: PositiveInt | None = None
    max_tokens_limit: PositiveInt | None = None
    on_exceed: OnExceed | None = None
    max_prompt_tokens: PositiveInt | None = None
    context_length: PositiveInt | None = None
    max_n: PositiveInt | None = None
    max_prompts: PositiveInt | None = None
    mode: PolicyMode | None = None
    tokenizer: str | None = None
    """Folder with the model's tokenizer.json and tokenizer_config.json."""
    token_source: TokenSource | None = None
    chat_template: str | None = None
    """The file given to the engine's --chat-template, when it was started with one: the
    local count must render the same template."""
    default_chat_template_kwargs: Mapping[str, Any] | None = None
    """The engine's --default-chat-template-kwargs, when it was started with them."""
    deadline_s: PositiveFloat | None = None
    """How long a request may take in all, retries after an engine restart included."""
    max_in_flight: PositiveInt | None = None
    """Admission bulkhead: requests of this model in flight to the engine at once."""
    trust_request_chat_template: bool | None = None
    """Mirror of the engine's --trust-request-chat-template: when false, a request carrying
    its own chat template is refused by the gateway as the engine would refuse it (and the
    gateway never renders it)."""


class Policy(_Frozen):
    """A fully resolved per-model policy (defaults merged with the model's overrides)."""

    default_max_tokens: PositiveInt = 256
    max_tokens_limit: PositiveInt = 4096
    on_exceed: OnExceed = OnExceed.CLAMP
    max_prompt_tokens: PositiveInt | None = None
    context_length: PositiveInt | None = None
    """None: read from the engine's /v1/models (max_model_len)."""
    max_n: PositiveInt = 8
    max_prompts: PositiveInt = 16
    mode: PolicyMode = PolicyMode.ENFORCE
    tokenizer: str | None = None
    token_source: TokenSource = TokenSource.AUTO
    chat_template: str | None = None
    default_chat_template_kwargs: Mapping[str, Any] | None = None
    deadline_s: PositiveFloat = 300.0
    max_in_flight: PositiveInt = 64
    trust_request_chat_template: bool = False


class IsolationConfig(_Frozen):
    """Attribution, probation and quarantine of requests that kill the engine."""

    enabled: bool = True
    quarantine_ttl_s: PositiveFloat = 3600.0
    quarantine_max_entries: PositiveInt = 1024
    suspect_failures: PositiveInt = 2
    """A fingerprint in flight at this many engine failures is quarantined even if probation
    could not single it out."""
    probation_timeout_s: PositiveFloat = 60.0
    """How long one suspect may run alone on probation before it is answered 503."""
    queue_max: PositiveInt = 256
    """Requests held while the engine restarts or the bulkhead is full; past it, 429/503."""
    queue_timeout_s: PositiveFloat = 30.0
    fingerprint_ignore: tuple[str, ...] = (
        "user",
        "stream",
        "stream_options",
        "request_id",
        "metadata",
        "service_tier",
        "store",
    )

    @cached_property
    def fingerprint_ignore_set(self) -> frozenset[str]:
        """`fingerprint_ignore` as a set, made once per snapshot."""
        return frozenset(self.fingerprint_ignore)


class LoggingConfig(_Frozen):
    level: str = "info"
    format: str = "auto"
    """json, console, or auto (console on a terminal, json elsewhere)."""


class Config(_Frozen):
    server: ServerConfig = Field(default_factory=ServerConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    defaults: PolicyOverride = Field(default_factory=PolicyOverride)
    models: Mapping[str, PolicyOverride] = Field(default_factory=dict)
    isolation: IsolationConfig = Field(default_factory=IsolationConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)

    _policies: dict[str | None, Policy] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _metrics_listener(self) -> Self:
        metrics = self.metrics
        if metrics.enabled and metrics.listener is MetricsListener.ADMIN and not self.admin.enabled:
            raise ValueError("metrics.listener is admin but admin.enabled is false")
        return self

    def model_post_init(self, context: Any, /) -> None:
        # Merged once per snapshot: the hot path only looks a policy up.
        self._policies[None] = _merge(self.defaults)
        for name, override in self.models.items():
            self._policies[name] = _merge(self.defaults, override)

    def policy_for(self, model: str | None) -> Policy:
        """The resolved policy of a model: its entry merged over the defaults, or the defaults."""
        policy = self._policies.get(model)
        return policy if policy is not None else self._policies[None]


def _merge(*layers: PolicyOverride) -> Policy:
    values: dict[str, Any] = {}
    for layer in layers:
        values.update(layer.model_dump(exclude_none=True))
    return Policy(**values)


class ConfigError(Exception):
    """config.yaml could not be loaded; the message names the key and what is wrong."""


def line_of(root: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """The line in the YAML text of the key at `loc`, as far down as the text has it."""
    node, line = root, None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _format_validation_error(path: str, err: ValidationError, root: yaml.Node | None = None) -> str:
    lines = [f"{path}: invalid configuration"]
    for item in err.errors():
        loc = tuple(item["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        line = line_of(root, loc)
        at = f" (line {line})" if line is not None else ""
        lines.append(f"  {where}{at}: {item['msg']}")
    return "\n".join(lines)


def parse_config(data: object, source: str = "config", root: yaml.Node | None = None) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, not {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(source, err, root)) from None


def load_config(path: str | Path) -> Config:
    return load_document(path)[0]


def load_document(path: str | Path) -> tuple[Config, yaml.Node | None]:
    """The snapshot, and the YAML node tree it came from (to name the line of a key in a
    later check, as `line_of` does)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_config(data, str(path), root), root


class ConfigHolder:
    """The current snapshot. Readers take `.current` once per request; a reload replaces it
    with one assignment, so a request never sees half of two configs."""

    __slots__ = ("_current",)

    def __init__(self, config: Config) -> None:
        self._current = config

    @property
    def current(self) -> Config:
        return self._current

    def swap(self, config: Config) -> Config:
        old, self._current = self._current, config
        return old
