"""Counting prompt tokens, and the deterministic words the emulator generates.

Without a model folder the emulator counts with a built-in rule, so tests need no tokenizer:

- text is split into pieces: each run of word characters (`\\w+`) is one token, each other
  non-space character is one token, whitespace is free; `<|im_start|>`, `<|im_end|>` and
  `<|endoftext|>` are one token each. No BOS token is added.
- a chat prompt is rendered ChatML-style, `<|im_start|>{role}\\n{content}<|im_end|>\\n` per
  message, and `<|im_start|>assistant\\n` as the generation prompt: each message costs 3 tokens
  plus its content, the generation prompt 2. `tools`, if any, are one more message holding
  their JSON. Only the text parts of a list content count.

Token ids: the pieces the emulator knows (specials, punctuation, its word list, roles) have
small fixed ids; any other piece gets a stable hashed id >= 1000 that /detokenize shows as
`<unk>`.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol


class Tokenizer(Protocol):
    """What the emulator asks of a tokenizer: `engine.tokenization.PromptTokenizer` or the
    built-in `WordTokenizer`."""

    def encode_completion(self, prompt: str, add_special_tokens: bool = True) -> list[int]: ...

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[Any] | None = None,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


# fmt: off
WORDS: tuple[str, ...] = (
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "then", "runs",
    "into", "a", "quiet", "green", "field", "where", "small", "birds", "sing", "about", "long",
    "summer", "days", "under", "warm", "light", "while", "old", "trees", "keep", "their",
    "shade", "for", "every", "tired", "walker", "who", "comes", "by", "with", "bread", "water",
    "some", "time", "to", "rest", "near", "river", "that", "flows", "slowly", "past", "stone",
    "bridge", "on", "its", "way", "down", "sea", "as", "it", "always", "has",
)
# fmt: on
"""What generated text is made of: token k of a choice is WORDS[(start + k) % 64]."""

_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_ROLES = ("system", "user", "assistant", "tool", "tools", "developer")
_VOCAB: tuple[str, ...] = (*_SPECIALS, *".,;:!?'\"()[]{}-_/*+=<>#@&%$", *WORDS, *_ROLES)
_UNKNOWN_BASE = 1000
_UNKNOWN_SPAN = 1_000_000
_PIECE = re.compile(r"<\|[a-z_]+\|>|\w+|[^\w\s]")


def generated_token(start: int, k: int) -> str:
    """Text of the k-th generated token of a choice whose words start at `start`."""
    word = WORDS[(start + k) % len(WORDS)]
    return word if k == 0 else f" {word}"


def content_text(content: object) -> str:
    """The text of a chat message's content: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = (p.get("text") for p in content if isinstance(p, Mapping))
        return "".join(t for t in parts if isinstance(t, str))
    return ""


def messages_text(messages: Iterable[Mapping[str, Any]]) -> list[str]:
    return [content_text(m.get("content")) for m in messages]


class WordTokenizer:
    """The built-in rule described in the module docstring."""

    def __init__(self) -> None:
        self._ids = {piece: i for i, piece in enumerate(_VOCAB)}

    def encode_completion(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        return [self._id(piece) for piece in _PIECE.findall(prompt)]

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[Any] | None = None,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        turns = [(str(m.get("role", "user")), content_text(m.get("content"))) for m in messages]
        if tools:
            turns.insert(0, ("tools", json.dumps(tools)))
        text = "".join(f"<|im_start|>{role}\n{body}<|im_end|>\n" for role, body in turns)
        if continue_final_message and turns:
            text = text.removesuffix("<|im_end|>\n")
        elif add_generation_prompt:
            text += "<|im_start|>assistant\n"
        return self.encode_completion(text)

    def decode(self, ids: list[int]) -> str:
        out: list[str] = []
        for token_id in ids:
            piece = _VOCAB[token_id] if 0 <= token_id < len(_VOCAB) else "<unk>"
            glue = out and piece[0].isalnum() and out[-1][-1:].isalnum()
            out.append(f" {piece}" if glue else piece)
        return "".join(out)

    def _id(self, piece: str) -> int:
        known = self._ids.get(piece)
        if known is not None:
            return known
        return _UNKNOWN_BASE + zlib.crc32(piece.encode()) % _UNKNOWN_SPAN


def prompt_seed(ids: Sequence[int]) -> int:
    """A stable number derived from a prompt: where its generated words start."""
    return zlib.crc32(",".join(map(str, ids)).encode())


def load_tokenizer(model_dir: Path | None) -> Tokenizer:
    if model_dir is None:
        return WordTokenizer()
    # Imported here: only this mode needs the tokenizers library and a model folder.
    from engine.tokenization import PromptTokenizer

    return PromptTokenizer.from_dir(model_dir)
