"""The vocabulary of each model, read from its folder: the bound of every token id a request
may carry (gateway.limits).

No engine endpoint reports it. vLLM sizes its logits by config.json's `vocab_size`, while its
own checks of some fields use the tokenizer's size; the two differ in many models (padded
embeddings, added tokens), and an id past the smaller one is what crashed engines. The bound is
therefore the smaller of the two. It is read once per model folder, in a worker thread, on the
first request after the engine became ready (a restart may come with other files), and kept.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from engine.state import EngineState, StateChange
from gateway.config import Policy
from gateway.limits import Vocabulary


def config_vocab_size(folder: Path) -> int | None:
    """config.json's `vocab_size` (or its `text_config`'s, for multimodal models)."""
    try:
        config: Any = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    for section in (config, config.get("text_config")):
        size = section.get("vocab_size") if isinstance(section, dict) else None
        if type(size) is int and size > 0:
            return size
    return None


def read_vocabulary(folder: Path) -> Vocabulary | None:
    """The vocabulary of a model folder; None when neither file says."""
    model_size = config_vocab_size(folder)
    tokenizer: Tokenizer | None
    try:
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception:  # noqa: BLE001 - tokenizers raises a bare Exception
        tokenizer = None
    tokenizer_size = None
    if tokenizer is not None:
        ids = tokenizer.get_vocab(with_added_tokens=True).values()
        tokenizer_size = max(ids) + 1 if ids else None
    sizes = [s for s in (model_size, tokenizer_size) if s is not None]
    if not sizes:
        return None
    size = min(sizes)
    if tokenizer is None or tokenizer_size is None or tokenizer_size <= size:
        return Vocabulary(size, tokenizer_size)
    # The tokenizer knows ids the model cannot output: bad_words must be tokenized to check.
    encoder = tokenizer

    def encode(text: str) -> list[int]:
        return list(encoder.encode(text, add_special_tokens=False).ids)

    return Vocabulary(size, tokenizer_size, encode)


class Vocabularies:
    """The vocabulary of each model folder, read on first use after the engine became ready."""

    def __init__(self) -> None:
        self._known: dict[Path, Vocabulary | None] = {}
        self._reading: dict[Path, asyncio.Task[Vocabulary | None]] = {}

    async def for_policy(self, policy: Policy) -> Vocabulary | None:
        """The bound for a model's token ids: `limits.vocab_size` when set, else read from
        `limits.model_dir` (or the policy's tokenizer folder); None when unknown."""
        limits = policy.limits
        folder = limits.model_dir or policy.tokenizer
        if limits.vocab_size is not None:
            return Vocabulary(limits.vocab_size)
        if folder is None:
            return None
        path = Path(folder)
        if path in self._known:
            return self._known[path]
        task = self._reading.get(path)
        if task is None:
            task = asyncio.ensure_future(asyncio.to_thread(read_vocabulary, path))
            self._reading[path] = task
        try:
            vocab = await asyncio.shield(task)
        finally:
            if task.done():
                self._reading.pop(path, None)
        self._known[path] = vocab
        return vocab

    def on_state_change(self, change: StateChange) -> None:
        """Subscribed to the supervisor: an engine that became ready again is read anew."""
        if change.new is EngineState.READY:
            self._known.clear()
