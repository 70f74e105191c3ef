"""Which policy a served model name takes. vLLM serves one model under several names
(`--served-model-name tiny tiny-alias`) and LoRA adapters on top of a base model; a policy
written for the model must hold under every name, or an alias is a way around it.

A name with a `models:` entry of its own keeps it; a name without takes the entry of another
name of the same model (same `root` in /v1/models; an adapter, its base model's), the first
in the engine's order; else the defaults. Pure functions, plus the one subscriber that logs,
at start and after every engine start, the served names without a policy of their own.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import structlog

from engine.state import EngineState, StateChange
from engine.supervisor import EngineSupervisor
from gateway.config import ConfigHolder

log = structlog.get_logger("gateway")


def policy_name(
    model: str | None, families: Mapping[str, str], configured: Collection[str]
) -> str | None:
    """The `models:` entry whose policy `model` takes (its own, or a sibling name's), or None
    for the defaults."""
    if model is None or model in configured:
        return model
    family = families.get(model)
    if family is None:
        return None
    return next((n for n, f in families.items() if f == family and n in configured), None)


def without_own_policy(
    families: Mapping[str, str], configured: Collection[str]
) -> dict[str, str | None]:
    """Each served name with no entry of its own, to the entry it takes (None: defaults)."""
    return {
        name: policy_name(name, families, configured) for name in families if name not in configured
    }


class AliasReporter:
    """Logs the served names without a policy of their own each time the engine is ready
    after a (re)start."""

    def __init__(self, config: ConfigHolder, supervisor: EngineSupervisor) -> None:
        self._config = config
        self._supervisor = supervisor
        supervisor.subscribe(self)

    def __call__(self, change: StateChange) -> None:
        if change.new is not EngineState.READY or change.old is EngineState.READY:
            return
        configured = self._config.current.models
        unpoliced = without_own_policy(self._supervisor.model_families, configured)
        if unpoliced:
            log.info(
                "served_models_without_policy",
                models=unpoliced,
                note="each takes the policy named (of the same model), or the defaults (null)",
            )
