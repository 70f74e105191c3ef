"""The JSON vLLM answers for generations, streamed or not. Pure builders, no I/O."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Literal

Kind = Literal["chat", "completion"]


@dataclass(frozen=True)
class Header:
    """What every response and chunk of one request repeats."""

    kind: Kind
    model: str
    id: str
    created: int

    @classmethod
    def new(cls, kind: Kind, model: str) -> Header:
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        return cls(kind, model, f"{prefix}-{uuid.uuid4().hex}", int(time.time()))

    def top(self, object_: str) -> dict[str, object]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, object]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
    }


def full_response(
    header: Header, texts: list[str], prompt_tokens: int, completion_tokens: int
) -> dict[str, object]:
    """A non-streamed response; every choice ends for length (see the package docstring)."""
    choices: list[dict[str, object]] = []
    for index, text in enumerate(texts):
        if header.kind == "chat":
            message: dict[str, object] = {
                "role": "assistant",
                "content": text,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "tool_calls": [],
                "reasoning_content": None,
            }
            choice: dict[str, object] = {"index": index, "message": message, "logprobs": None}
        else:
            choice = {"index": index, "text": text, "logprobs": None}
        choices.append({**choice, "finish_reason": "length", "stop_reason": None})
    object_ = "chat.completion" if header.kind == "chat" else "text_completion"
    return {
        **header.top(object_),
        "choices": choices,
        "system_fingerprint": None,
        "usage": usage(prompt_tokens, completion_tokens),
        "prompt_logprobs": None,
        "kv_transfer_params": None,
    }


def _chunk(header: Header, choice: dict[str, object]) -> dict[str, object]:
    object_ = "chat.completion.chunk" if header.kind == "chat" else "text_completion"
    return {**header.top(object_), "choices": [choice]}


def role_chunk(header: Header, index: int) -> dict[str, object]:
    delta = {"role": "assistant", "content": ""}
    return _chunk(header, {"index": index, "delta": delta, "logprobs": None, "finish_reason": None})


def token_chunk(header: Header, index: int, text: str, last: bool) -> dict[str, object]:
    if header.kind == "chat":
        choice: dict[str, object] = {"index": index, "delta": {"content": text}}
    else:
        choice = {"index": index, "text": text}
    choice = {**choice, "logprobs": None, "finish_reason": "length" if last else None}
    if last:
        choice["stop_reason"] = None
    return _chunk(header, choice)


def usage_chunk(header: Header, prompt_tokens: int, completion_tokens: int) -> dict[str, object]:
    object_ = "chat.completion.chunk" if header.kind == "chat" else "text_completion"
    counts = usage(prompt_tokens, completion_tokens)
    del counts["prompt_tokens_details"]
    return {**header.top(object_), "choices": [], "usage": counts}


def sse(data: dict[str, object] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


DONE = sse("[DONE]")
