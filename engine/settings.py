"""Engine settings: where the engine answers, how to start it, and how it is watched.

Part of config.yaml (its `engine:` section); defined here because engine supervision reads it
and `engine` never imports `gateway`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class EngineConfig(BaseModel):
    """Where the engine answers, and optionally how to start it (supervised shape)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = "http://127.0.0.1:8000"
    command: tuple[str, ...] | None = None
    """argv of an engine process the gateway starts, watches and stops with itself.
    Without it the engine runs elsewhere (its own container: sidecar shape)."""
    env: Mapping[str, str] = Field(default_factory=dict)
    """Extra environment for the engine process."""
    connect_timeout_s: PositiveFloat = 5.0
    """Bound on opening a connection to the engine. There is no read timeout on purpose:
    a long non-streamed generation sends nothing for many seconds; a stuck engine is the
    supervisor's to notice."""
    probe_interval_s: PositiveFloat = 5.0
    """How often the readiness probe runs while the engine is ready."""
    startup_probe_interval_s: PositiveFloat = 1.0
    """How often it runs while the engine is starting or failed."""
    probe_timeout_s: PositiveFloat = 10.0
    """Bound on one probe request (/health, /v1/models, or the one-token generation)."""
    probe: Literal["auto", "completions", "chat"] = "auto"
    """The path of the one-token probe generation: `completions` (POST /v1/completions),
    `chat` (POST /v1/chat/completions), or `auto`: completions, and chat when completions
    answers 404 or 405 (an engine that serves only chat); discovered once per start."""
    sidecar_hold_s: Annotated[float, Field(ge=0)] = 10.0
    """Sidecar shape: how long after the engine stopped being ready requests (in flight and
    new) are held for its return (the kubelet restarting it) before they are answered 503.
    The supervised shape holds within the isolation queue's bounds instead."""
    health_failures: PositiveInt = 3
    """Consecutive failed /health probes that mark a running engine failed."""
    wedge_timeout_s: PositiveFloat = 60.0
    """No progress for this long (in-flight requests get no bytes and the engine's generated
    token counter stands still) makes the engine a suspect of a wedge; a probe generation
    then settles it."""
    startup_timeout_s: PositiveFloat = 600.0
    """A started engine that is not ready within this is failed and restarted."""
    stop_grace_s: PositiveFloat = 10.0
    """SIGTERM to the engine's process group, then SIGKILL after this long."""
    restart_backoff_s: PositiveFloat = 1.0
    restart_backoff_max_s: PositiveFloat = 30.0
    max_restarts: PositiveInt = 5
    """Give up after this many restarts within `restart_window_s`."""
    restart_window_s: PositiveFloat = 600.0
    expected_restart_s: PositiveFloat = 30.0
    """Retry-After given to clients while the engine restarts, until a start has been timed."""
    wedge_check_interval_s: PositiveFloat = 1.0
    """How often a ready engine is checked for a wedge. Its /metrics is read at this pace only
    while in-flight requests stall."""
