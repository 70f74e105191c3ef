"""Resuming a cut stream, as pure functions: what was sent, what is asked next, how the
continuation's events are rewritten."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.resume import (
    MAX_LOG_BYTES,
    EventRewriter,
    StreamLog,
    continuation,
    partial_answer,
    resumable,
)


def _sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)


def _chunk(
    content: str | None = None, role: bool = False, finish: str | None = None, index: int = 0
) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    return {
        "id": "chatcmpl-1",
        "created": 7,
        "object": "chat.completion.chunk",
        "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
    }


def _log(data: bytes, cut_at: int | None = None) -> StreamLog:
    log = StreamLog()
    raw = data if cut_at is None else data[:cut_at]
    for i in range(0, len(raw), 7):  # arrives in arbitrary pieces
        log.append(raw[i : i + 7])
    return log


def test_partial_answer_reads_whole_events_only() -> None:
    """The text sent is the content of whole events; a half-received event does not count."""
    data = _sse(_chunk("", role=True), _chunk("Hello"), _chunk(" world"), _chunk(" again"))
    partial = partial_answer(_log(data, cut_at=len(data) - 5), chat=True)
    assert partial is not None
    assert (partial.id, partial.created, partial.text, partial.tokens) == (
        "chatcmpl-1",
        7,
        "Hello world",
        2,
    )
    assert not partial.finished


@pytest.mark.parametrize(
    ("events", "why"),
    [
        ([_chunk("a"), _chunk("b", index=1)], "several choices"),
        ([_chunk("a"), {"error": {"message": "x", "code": 500}}], "an error was already sent"),
    ],
)
def test_unresumable_streams(events: list[dict[str, Any]], why: str) -> None:
    """Streams with several choices, or that already carry an error, are not resumed."""
    assert partial_answer(_log(_sse(*events)), chat=True) is None, why


def test_a_stream_too_long_to_keep_is_not_resumed() -> None:
    """Past MAX_LOG_BYTES the log is dropped rather than held."""
    log = StreamLog()
    log.append(b"x" * (MAX_LOG_BYTES + 1))
    assert not log.usable
    assert partial_answer(log, chat=True) is None


@pytest.mark.parametrize(
    ("body", "chat", "expected"),
    [
        ({"stream": True, "messages": []}, True, True),
        ({"stream": False, "messages": []}, True, False),
        ({"stream": True, "messages": [], "n": 2}, True, False),
        ({"stream": True, "messages": [], "logprobs": True}, True, False),
        ({"stream": True, "messages": [], "tools": [{}]}, True, False),
        ({"stream": True, "prompt": "abc"}, False, True),
        ({"stream": True, "prompt": [1, 2, 3]}, False, False),
        ({"stream": True, "prompt": "abc", "echo": True}, False, False),
    ],
)
def test_which_streams_are_resumable(body: dict[str, Any], chat: bool, expected: bool) -> None:
    """Only single-choice text streams are resumed."""
    assert resumable(body, chat) is expected


def test_chat_continuation_continues_the_assistant_message() -> None:
    """Chat: the partial answer goes back as the final assistant message, continued, with the
    budget reduced by the tokens sent; other fields stay."""
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 10,
        "max_completion_tokens": 10,
        "stream": True,
        "temperature": 0,
    }
    partial = partial_answer(
        _log(_sse(_chunk("", role=True), _chunk("A"), _chunk(" B"))), chat=True
    )
    assert partial is not None
    rest = continuation(body, partial, chat=True)
    assert rest is not None
    assert rest["messages"][-1] == {"role": "assistant", "content": "A B"}
    assert rest["messages"][:-1] == body["messages"]
    assert rest["continue_final_message"] is True
    assert rest["add_generation_prompt"] is False
    assert rest["max_tokens"] == rest["max_completion_tokens"] == 8
    assert rest["temperature"] == 0
    assert body["messages"] == [{"role": "user", "content": "hi"}]  # not mutated


def test_completion_continuation_extends_the_prompt() -> None:
    """Completions: the prompt plus the text sent; nothing left means no continuation."""
    events = [
        {"id": "cmpl-1", "created": 1, "choices": [{"index": 0, "text": t}]}
        for t in ("one", " two")
    ]
    partial = partial_answer(_log(_sse(*events)), chat=False)
    assert partial is not None
    rest = continuation({"prompt": "Count:", "max_tokens": 5}, partial, chat=False)
    assert rest is not None
    assert rest["prompt"] == "Count:one two"
    assert rest["max_tokens"] == 3
    assert continuation({"prompt": "Count:", "max_tokens": 2}, partial, chat=False) is None


def test_rewriter_keeps_id_drops_second_role_and_fixes_usage() -> None:
    """The continuation's events take the original id and created, lose their role chunk,
    and report usage for the whole answer."""
    partial = partial_answer(
        _log(_sse(_chunk("", role=True), _chunk("A"), _chunk(" B"))), chat=True
    )
    assert partial is not None
    rewriter = EventRewriter(partial, chat=True)
    second = [
        {**_chunk("", role=True), "id": "chatcmpl-2", "created": 9},
        {**_chunk(" C"), "id": "chatcmpl-2", "created": 9},
        {
            "id": "chatcmpl-2",
            "created": 9,
            "choices": [],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
        },
    ]
    raw = _sse(*second) + b"data: [DONE]\n\n"
    out = b"".join(rewriter.feed(raw[i : i + 5]) for i in range(0, len(raw), 5))
    blocks = [b for b in out.split(b"\n\n") if b]
    assert blocks[-1] == b"data: [DONE]"
    events = [json.loads(b[6:]) for b in blocks[:-1]]
    assert len(events) == 2
    assert {e["id"] for e in events} == {"chatcmpl-1"}
    assert {e["created"] for e in events} == {7}
    assert events[0]["choices"][0]["delta"] == {"content": " C"}
    assert events[1]["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
