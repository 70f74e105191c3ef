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
from urllib.parse import parse_qs, urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

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
_ANY_HOST = frozenset({"0.0.0.0", "::", ""})

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
    header_timeout_s: PositiveFloat = 10.0
    """How long a client may take to send a request's line and headers (from the connection's
    opening, or from the first byte of a next request); then the connection is closed."""
    body_timeout_s: PositiveFloat = 30.0
    """How long a client may take to send a request's body once its headers are in (408)."""
    keepalive_timeout_s: PositiveFloat = 75.0
    """How long an idle kept-alive connection stays open."""
    client_write_timeout_s: PositiveFloat = 30.0
    """How long a write to a client that does not read may wait: then the client is cut, its
    work at the engine cancelled and its bulkhead slot freed."""
    count_threads: PositiveInt = 1
    """Worker threads that count the prompts too long to count on the event loop (more than
    16,384 characters of text, or a template of the request's own), like vLLM's
    `--renderer-num-workers` (also 1 by default). Counting is CPU work: more threads than the
    gateway's cores add no throughput, and each holds about 10 MB while it encodes a
    30,000-token prompt. A burst of long prompts queues for them."""
    api_key_env: tuple[str, ...] = ("VLLM_API_KEY",)
    """Environment variables holding the engine's API keys (vLLM reads VLLM_API_KEY). When any
    is set, a request to /v1 without one of them as its bearer token is answered 401 in vLLM's
    shape before its body is read."""

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


class ForbiddenAction(StrEnum):
    REFUSE = "refuse"
    STRIP = "strip"


class RemoteMedia(StrEnum):
    REFUSE = "refuse"
    """Every http(s) media URL is refused (the engine would fetch it from inside the pod)."""
    ALLOW_LIST = "allow-list"
    """Only URLs whose host is in `remote_media_hosts`."""
    ANY = "any"


ENGINE_INTERNAL_FIELDS: tuple[str, ...] = ("kv_transfer_params", "ec_transfer_params", "vllm_xargs")
"""Request fields of vLLM 0.32 that only other engine components are meant to set:
kv_transfer_params and ec_transfer_params (disaggregated prefill/decode and encoder-cache
transfers: a client-made one sent a decode engine out of memory, vllm#51137) and vllm_xargs
(raw arguments for custom logits processors, passed to the engine as `extra_args`)."""


class Limits(_Frozen):
    """Request shapes refused before the engine sees them (gateway.limits). Crash class: refused
    in every mode. Cost class: follows the policy's `mode` (report: `would-reject` header and
    log line). Every default is far above what ordinary traffic sends."""

    vocab_size: PositiveInt | None = None
    """Token ids must be below this (crash class). None: min(config.json `vocab_size`, the
    tokenizer's size), read from `model_dir` (else the policy's `tokenizer` folder) when the
    engine becomes ready; unknown when neither is readable (ids then only checked >= 0)."""
    model_dir: str | None = None
    """The model folder with config.json; None: the policy's `tokenizer` folder."""
    max_token_ids: PositiveInt = 1024
    """Entries of logit_bias, allowed_token_ids, stop_token_ids, logprob_token_ids (cost)."""
    max_bad_words: PositiveInt = 64
    """Entries of bad_words (cost); their token ids are checked in the vocabulary too. vLLM
    takes at most 128 token sequences after tokenizing (VLLM_MAX_NUM_BAD_WORDS), up to two
    per word (with and without a leading space)."""
    max_logprobs: int = Field(20, ge=0)
    """logprobs / top_logprobs at most this: the engine's --max-logprobs (vLLM's default 20)."""
    prompt_logprobs: bool = False
    """prompt_logprobs (and echo with logprobs, which implies it) refused unless true: on a
    long prompt it sent engines out of memory (vllm#16836)."""
    max_prompt_logprobs: int = Field(5, ge=0)
    """When prompt_logprobs are allowed: at most this many per prompt token (cost)."""
    structured_outputs: bool = True
    """False: no response_format json_*, structured_outputs, guided_* (crash class)."""
    max_schema_bytes: PositiveInt = 65536
    """Bytes of one JSON schema, tool parameters included, as JSON (cost)."""
    max_schema_depth: PositiveInt = 32
    """Nesting of schema objects in one schema (cost)."""
    max_schema_alternatives: PositiveInt = 64
    """Entries of one oneOf / anyOf / allOf (cost)."""
    max_schema_enum: PositiveInt = 512
    """Entries of one enum, and of a choice list (cost)."""
    max_regex_chars: PositiveInt = 4096
    max_grammar_chars: PositiveInt = 65536
    forbidden_fields: tuple[str, ...] = ENGINE_INTERNAL_FIELDS
    """Fields a client must not set (crash class)."""
    forbidden_action: ForbiddenAction = ForbiddenAction.REFUSE
    """refuse: 400 naming the field; strip: remove it and forward the rest."""
    allow_priority: bool = False
    """priority other than 0 is a forbidden field unless true (the engine must also run
    --scheduling-policy priority)."""
    max_output_tokens_total: PositiveInt = 32768
    """n (or best_of) x max_tokens per request, after the per-choice limit; over it, lowered
    or refused as `on_exceed` says (cost)."""
    max_stop: PositiveInt = 4
    """Entries of stop (cost): vLLM 0.32's own bound (VLLM_MAX_STOP_STRINGS, 4), refused here
    before the engine; raise both together."""
    max_stop_chars: PositiveInt = 1024
    """Characters of one stop string (cost)."""
    max_media_parts: PositiveInt = 16
    """Image, audio and video parts of one request (cost)."""
    max_media_bytes: PositiveInt = 16 * 1024 * 1024
    """Decoded bytes of one inline (data: or input_audio) media item (cost)."""
    min_image_side: PositiveInt = 2
    """Smallest width or height of an inline image: a 1x1 image crashed vLLM (CVE-2026-22773)
    (crash class)."""
    max_image_side: PositiveInt = 16384
    max_image_pixels: PositiveInt = 50_000_000
    """Width x height of an inline image, read from its header (cost)."""
    remote_media: RemoteMedia = RemoteMedia.REFUSE
    """http(s) media URLs, which the engine fetches itself from inside the pod (crash class:
    refused in every mode). file: and other schemes are always refused."""
    remote_media_hosts: tuple[str, ...] = ()
    """Hosts allowed when `remote_media: allow-list` (exact names, lower case)."""

    @cached_property
    def forbidden(self) -> frozenset[str]:
        return frozenset(self.forbidden_fields)

    @cached_property
    def media_hosts(self) -> frozenset[str]:
        return frozenset(h.lower() for h in self.remote_media_hosts)


class LimitsOverride(_Frozen):
    """`limits:` as written in YAML: a model's entry overrides the defaults' field by field."""

    vocab_size: PositiveInt | None = None
    model_dir: str | None = None
    max_token_ids: PositiveInt | None = None
    max_bad_words: PositiveInt | None = None
    max_logprobs: Annotated[int, Field(ge=0)] | None = None
    prompt_logprobs: bool | None = None
    max_prompt_logprobs: Annotated[int, Field(ge=0)] | None = None
    structured_outputs: bool | None = None
    max_schema_bytes: PositiveInt | None = None
    max_schema_depth: PositiveInt | None = None
    max_schema_alternatives: PositiveInt | None = None
    max_schema_enum: PositiveInt | None = None
    max_regex_chars: PositiveInt | None = None
    max_grammar_chars: PositiveInt | None = None
    forbidden_fields: tuple[str, ...] | None = None
    forbidden_action: ForbiddenAction | None = None
    allow_priority: bool | None = None
    max_output_tokens_total: PositiveInt | None = None
    max_stop: PositiveInt | None = None
    max_stop_chars: PositiveInt | None = None
    max_media_parts: PositiveInt | None = None
    max_media_bytes: PositiveInt | None = None
    min_image_side: PositiveInt | None = None
    max_image_side: PositiveInt | None = None
    max_image_pixels: PositiveInt | None = None
    remote_media: RemoteMedia | None = None
    remote_media_hosts: tuple[str, ...] | None = None


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
    max_in_flight_per_client: PositiveInt | None = None
    """One client's share of the bulkhead (a client is its bearer token, or its address
    without one); past it, 429 at once. Unset: no share."""
    trust_request_chat_template: bool | None = None
    """Mirror of the engine's --trust-request-chat-template: when false, a request carrying
    its own chat template is refused by the gateway as the engine would refuse it (and the
    gateway never renders it)."""
    limits: LimitsOverride | None = None
    """Request hardening (`Limits`), merged field by field like the rest of the policy."""


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
    max_in_flight_per_client: PositiveInt | None = None
    trust_request_chat_template: bool = False
    limits: Limits = Field(default_factory=Limits)


REDIS_SCHEMES = ("redis", "rediss", "unix")


class SharedConfig(_Frozen):
    """One quarantine for every replica, shared through Redis (gateway.fleet). The password
    never comes from this file: it is read from the environment variable `password_env`."""

    url: str
    """redis://host:6379/0, rediss:// for TLS, or unix:///path/redis.sock; no password."""
    password_env: str = "VLLM_GUARD_REDIS_PASSWORD"  # noqa: S105 (a variable's name)
    """The environment variable holding the password (unset or empty: no AUTH)."""
    username: str | None = None
    """For Redis ACLs; the default user when unset."""
    key_prefix: str = Field("vllm-guard", min_length=1, pattern=r"^[A-Za-z0-9_.:{}-]+$")
    """One per deployment: replicas with the same prefix share one quarantine."""
    replica_id: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[^\s]+$")
    """This replica's name in shared entries; the host name (the pod's name) when unset."""
    connect_timeout_s: PositiveFloat = 2.0
    command_timeout_s: PositiveFloat = 2.0
    """Each Redis command; past it Redis counts as unreachable."""
    reconnect_s: PositiveFloat = 1.0
    """Wait between attempts to reach Redis again, doubling up to 10 times this."""
    health_check_s: PositiveFloat = 5.0
    """An idle connection is checked (PING) this often, so a silent Redis is noticed."""

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        check_redis_url(url)
        return url


def check_redis_url(url: str) -> None:
    """A Redis URL with a scheme we know, a host (or socket path) and no password in it."""
    parts = urlsplit(url)
    if parts.scheme not in REDIS_SCHEMES:
        raise ValueError(
            f"url must start with one of {', '.join(s + '://' for s in REDIS_SCHEMES)}"
        )
    if parts.password is not None or "password" in parse_qs(parts.query):
        raise ValueError(
            "url must not hold a password: put it in the environment variable named by password_env"
        )
    if parts.scheme == "unix" and not parts.path:
        raise ValueError("a unix:// url needs the socket's path")
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError("url needs a host")


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
    shared: SharedConfig | None = None
    """Share culprits and suspicion with every replica through Redis; unset: this replica's
    quarantine is its own."""

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

    @model_validator(mode="after")
    def _metrics_listener(self) -> Self:
        metrics = self.metrics
        if metrics.enabled and metrics.listener is MetricsListener.ADMIN and not self.admin.enabled:
            raise ValueError("metrics.listener is admin but admin.enabled is false")
        return self

    def model_post_init(self, context: Any, /) -> None:
        # Merged once per snapshot (and now, so that a policy that does not validate stops
        # the load): the hot path only looks a policy up.
        _ = self.resolved_policies

    @cached_property
    def resolved_policies(self) -> dict[str | None, Policy]:
        """Each `models:` entry merged over the defaults; None: the defaults alone. (A
        cached property, not a private attribute: pydantic's lookup of those is slow.)"""
        policies: dict[str | None, Policy] = {None: _merge(self.defaults)}
        for name, override in self.models.items():
            policies[name] = _merge(self.defaults, override)
        return policies

    @model_validator(mode="after")
    def _check_ports(self) -> Self:
        server, admin = self.server, self.admin
        hosts_meet = server.host == admin.host or bool(_ANY_HOST & {server.host, admin.host})
        if admin.enabled and server.port != 0 and admin.port == server.port and hosts_meet:
            raise ValueError(
                f"admin.port {admin.port} is server.port: the operator's listener must have "
                "a port of its own"
            )
        return self

    def has_policy(self, model: str) -> bool:
        """Whether config.yaml has a `models:` entry of this very name."""
        return model in self.models

    def policy_for(self, model: str | None) -> Policy:
        """The resolved policy of a model: its entry merged over the defaults, or the defaults."""
        policies = self.resolved_policies
        policy = policies.get(model)
        return policy if policy is not None else policies[None]


def _merge(*layers: PolicyOverride) -> Policy:
    """Later layers win field by field; `limits` is merged field by field too, so a model's
    partial `limits:` keeps every limit it does not name from the defaults."""
    values: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    for layer in layers:
        values.update(layer.model_dump(exclude_none=True, exclude={"limits"}))
        if layer.limits is not None:
            limits.update(layer.limits.model_dump(exclude_none=True))
    return Policy(**values, limits=Limits(**limits))


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
