"""What the engine says about itself: the models it serves and their context windows.

One record, `EngineFacts`, read from `GET /v1/models` by the supervisor each time the engine
becomes ready (after a start, a restart, or a sidecar engine's return), so that nothing the
gateway decides rests on what an earlier engine said. Pure: parsing only, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """One served model id (a LoRA adapter is one too)."""

    id: str
    max_model_len: int
    root: str | None = None
    """The weights it was loaded from (vLLM's `root`: a path or a Hub name)."""
    parent: str | None = None
    """For a LoRA adapter, the base model it runs on."""


@dataclass(frozen=True, slots=True)
class EngineFacts:
    """The engine's served models in listed order (the first is the default)."""

    models: Mapping[str, ModelFacts] = field(default_factory=lambda: MappingProxyType({}))
    lengths: Mapping[str, int] = field(init=False, repr=False, compare=False)
    """Model id to max_model_len, in listed order."""
    families: Mapping[str, str] = field(init=False, repr=False, compare=False)
    """Each served id to the model it serves: its `root` (vLLM gives every
    --served-model-name of one model the same root, else the id itself); a LoRA adapter to
    its base model's. The gateway gives the names of one model the same policy."""

    def __post_init__(self) -> None:
        # Both are read for every request: made once, with the facts.
        lengths = {m.id: m.max_model_len for m in self.models.values()}
        object.__setattr__(self, "lengths", MappingProxyType(lengths))
        object.__setattr__(self, "families", MappingProxyType(_families(self.models)))

    @property
    def default_model(self) -> str | None:
        return next(iter(self.models), None)


def _families(models: Mapping[str, ModelFacts]) -> dict[str, str]:
    def family(model: ModelFacts) -> str:
        return model.root or model.id

    out: dict[str, str] = {}
    for model in models.values():
        base = models.get(model.parent) if model.parent else None
        out[model.id] = family(base) if base is not None else (model.parent or family(model))
    return out


def parse_facts(payload: object) -> EngineFacts:
    """The facts in a /v1/models body. vLLM lists LoRA adapters without a max_model_len: they
    take their parent's (or the first model's). Entries without a usable id are skipped; a model
    whose length cannot be known is left out."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        return EngineFacts()
    lengths: dict[str, int] = {}
    entries: list[tuple[str, str | None, str | None]] = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            continue
        model_id: str = item["id"]
        root, parent = item.get("root"), item.get("parent")
        entries.append(
            (
                model_id,
                root if isinstance(root, str) else None,
                parent if isinstance(parent, str) else None,
            )
        )
        length = item.get("max_model_len")
        if isinstance(length, int) and not isinstance(length, bool) and length > 0:
            lengths[model_id] = length
    default = next(iter(lengths.values()), None)
    models: dict[str, ModelFacts] = {}
    for model_id, root, parent in entries:
        length = lengths.get(model_id) or lengths.get(parent or "") or default
        if length is not None:
            models[model_id] = ModelFacts(model_id, length, root, parent)
    return EngineFacts(MappingProxyType(models))
