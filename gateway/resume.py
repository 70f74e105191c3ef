"""Resuming a stream the engine's death cut: the client sees a pause, then the rest of one
continuous answer.

While a resumable stream runs, the bytes the client received are kept (up to a bound). When
the engine dies mid-stream, they are read back: the text sent so far, the chunk id and
`created`. After the restart, a continuation is asked for, in the OpenAI API's own terms:

- chat: the partial assistant message is sent back with vLLM's `continue_final_message: true`
  (and `add_generation_prompt: false`), so the model continues that very message;
- completions: the prompt plus the text already sent;

with the output budget reduced by the tokens already sent. The continuation's events are
rewritten on the way to the client: the original id and `created`, no second role chunk, and
a usage that counts the whole answer.

Only single-choice text streams are resumed (`n` 1, a text prompt, no `echo`, no logprobs);
any other cut stream ends with vLLM's streaming error event. Nothing here does I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_LOG_BYTES = 1 << 20
"""A stream that sent more than this is not resumable (its log is dropped)."""


class StreamLog:
    """The bytes a client received, kept while they are few enough to resume from."""

    __slots__ = ("_chunks", "_size")

    def __init__(self) -> None:
        self._chunks: list[bytes] | None = []
        self._size = 0

    def append(self, chunk: bytes) -> None:
        if self._chunks is None:
            return
        self._size += len(chunk)
        if self._size > MAX_LOG_BYTES:
            self._chunks = None
        else:
            self._chunks.append(chunk)

    @property
    def usable(self) -> bool:
        return self._chunks is not None

    def events(self) -> list[dict[str, Any]]:
        """The JSON `data:` events received so far, whole events only."""
        if self._chunks is None:
            return []
        text = b"".join(self._chunks).decode("utf-8", "replace")
        events = []
        for block in text.split("\n\n")[:-1]:  # the last piece may be an unfinished event
            for line in block.splitlines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    try:
                        event = json.loads(line[6:])
                    except ValueError:
                        continue
                    if isinstance(event, dict):
                        events.append(event)
        return events


@dataclass(frozen=True, slots=True)
class Partial:
    """What the client has of the answer."""

    id: str | None
    created: int | None
    text: str
    tokens: int
    """Tokens of it, counted as the chunks that carried text: the engine streams one chunk
    per generated token (vLLM skips a chunk only while a character is incomplete), so this is
    the engine's own count, not a re-tokenisation of the text."""
    finished: bool
    """A finish_reason was sent: only the end of the stream is missing."""


def partial_answer(log: StreamLog, chat: bool) -> Partial | None:
    """Read back what was sent; None when it cannot be resumed (several choices, an error)."""
    if not log.usable:
        return None
    ident: str | None = None
    created: int | None = None
    pieces: list[str] = []
    finished = False
    for event in log.events():
        if "error" in event:
            return None
        ident = ident or event.get("id")
        created = created or event.get("created")
        for choice in event.get("choices") or []:
            if choice.get("index", 0) != 0:
                return None
            piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            if isinstance(piece, str) and piece:
                pieces.append(piece)
            if choice.get("finish_reason") is not None:
                finished = True
    return Partial(ident, created, "".join(pieces), len(pieces), finished)


def resumable(body: Mapping[str, Any], chat: bool) -> bool:
    """Whether a stream of this request could be resumed at all (decided before it runs, so
    that nothing is recorded for the others)."""
    if body.get("stream") is not True or body.get("n", 1) not in (1, None):
        return False
    if body.get("best_of") not in (None, 1) or body.get("logprobs") or body.get("top_logprobs"):
        return False
    if chat:
        return not body.get("continue_final_message") and not body.get("tools")
    return isinstance(body.get("prompt"), str) and not body.get("echo")


def continuation(body: Mapping[str, Any], partial: Partial, chat: bool) -> dict[str, Any] | None:
    """The request that asks for the rest of the answer, or None when nothing is left."""
    budget = int(body["max_tokens"]) - partial.tokens
    if budget < 1 or partial.finished:
        return None
    out = dict(body)
    out["max_tokens"] = budget
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = budget
    if chat:
        out["messages"] = [*body["messages"], {"role": "assistant", "content": partial.text}]
        out["continue_final_message"] = True
        out["add_generation_prompt"] = False
    else:
        out["prompt"] = body["prompt"] + partial.text
    return out


class EventRewriter:
    """Rewrites a continuation's SSE events so they read as the rest of the original stream."""

    def __init__(self, partial: Partial, chat: bool) -> None:
        self._partial = partial
        self._sent_tokens = partial.tokens
        self._chat = chat
        self._buffer = b""

    def feed(self, chunk: bytes) -> bytes:
        self._buffer += chunk
        *blocks, self._buffer = self._buffer.split(b"\n\n")
        return b"".join(self._rewrite(block) for block in blocks)

    def _rewrite(self, block: bytes) -> bytes:
        if not block.startswith(b"data: ") or block == b"data: [DONE]":
            return block + b"\n\n"
        try:
            event = json.loads(block[6:])
        except ValueError:
            return block + b"\n\n"
        if not isinstance(event, dict) or "error" in event:
            return block + b"\n\n"
        if self._partial.id is not None:
            event["id"] = self._partial.id
        if self._partial.created is not None:
            event["created"] = self._partial.created
        choices = event.get("choices") or []
        if self._chat and choices and _role_only(choices[0]):
            return b""  # the client already had the assistant's role chunk
        usage = event.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            usage["completion_tokens"] += self._sent_tokens
            if isinstance(usage.get("prompt_tokens"), int):
                usage["prompt_tokens"] -= self._sent_tokens
        return b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n"


def _role_only(choice: Mapping[str, Any]) -> bool:
    delta = choice.get("delta") or {}
    return "role" in delta and not delta.get("content") and choice.get("finish_reason") is None
