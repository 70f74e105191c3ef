"""The gateway in front of the real vLLM: a client cannot tell it from the engine, except for
the protection."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import openai
import pytest

from tests.helpers import CHAT_PATH, base_url, gateway_config, post
from tests.real_engine import RealEngine

pytestmark = pytest.mark.engine

CHAT = {
    "model": "tiny",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me about pipes."},
    ],
    "max_tokens": 24,
    "temperature": 0,
    "seed": 7,
}
COMPLETION = {
    "model": "tiny",
    "prompt": "The quick brown fox",
    "max_tokens": 24,
    "temperature": 0,
    "seed": 7,
}
VOLATILE = {"id", "created", "system_fingerprint"}


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _piece_key(event: Any) -> str | None:
    """Where a text event of a one-choice stream carries its piece ("text" in a completion,
    the delta's "content" in a chat), or None for any other event (a chat's role chunk, the
    usage event, [DONE])."""
    if not isinstance(event, dict) or len(event.get("choices") or []) != 1:
        return None
    choice = event["choices"][0]
    if "text" in choice:
        return "text"
    delta = choice.get("delta")
    if isinstance(delta, dict) and "role" not in delta and isinstance(delta.get("content"), str):
        return "content"
    return None


def _piece(event: dict[str, Any], key: str) -> str:
    choice = event["choices"][0]
    text: str = choice["text"] if key == "text" else choice["delta"]["content"]
    return text


def _with_piece(event: dict[str, Any], key: str, text: str) -> dict[str, Any]:
    choice = dict(event["choices"][0])
    if key == "text":
        choice["text"] = text
    else:
        choice["delta"] = {**choice["delta"], "content": text}
    return {**event, "choices": [choice]}


def _coalesced(events: list[Any]) -> tuple[list[Any], list[Any]]:
    """A one-choice stream as vLLM would have sent it had it merged every text event into
    the next (the last one keeps its finish_reason and stop_reason), without the volatile
    fields; and the text events but the last, each with its piece blanked (their shape)."""
    out: list[Any] = []
    shapes: list[Any] = []
    for event in _strip(events):
        key = _piece_key(event)
        before = _piece_key(out[-1]) if out else None
        if key is not None and before == key:
            shapes.append(_with_piece(out[-1], key, ""))
            out[-1] = _with_piece(event, key, _piece(out[-1], key) + _piece(event, key))
        else:
            out.append(event)
    return out, shapes


async def _json(base: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    answer = await post(base + path, body)
    return answer["status"], answer["json"]


async def _sse(base: str, path: str, body: dict[str, Any]) -> list[Any]:
    answer = await post(base + path, body)
    assert answer["status"] == 200
    assert answer["content_type"] == "text/event-stream"
    events: list[Any] = answer["events"]
    return events


@pytest.mark.parametrize(
    ("path", "body"), [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)]
)
async def test_json_answers_equal_the_engines(
    gateway_server: Any, real_engine: RealEngine, path: str, body: dict[str, Any]
) -> None:
    """A non-streamed answer through the gateway equals the engine's own (same seed)."""
    server = await gateway_server(gateway_config(real_engine.url))
    direct_status, direct = await _json(real_engine.url, path, body)
    via_status, via = await _json(base_url(server), path, body)
    assert direct_status == via_status == 200
    assert _strip(via) == _strip(direct)
    assert via["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(
    ("path", "body"), [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)]
)
async def test_streamed_answers_equal_the_engines(
    gateway_server: Any, real_engine: RealEngine, path: str, body: dict[str, Any]
) -> None:
    """A streamed answer through the gateway is the engine's own: the same text, finish and
    stop reasons, usage and events, up to how vLLM splits the text into events. That split
    varies between two runs of the same request at the engine alone: its output collector
    (vllm/v1/engine/output_processor.py, RequestOutputCollector) merges the outputs of
    several engine steps into one event whenever the API server's loop falls behind the
    engine (a loaded machine), so the text events are compared merged, and their number and
    shape checked, not their boundaries."""
    server = await gateway_server(gateway_config(real_engine.url))
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    direct = await _sse(real_engine.url, path, body)
    via = await _sse(base_url(server), path, body)
    assert via[-1] == "[DONE]"
    (merged_via, shapes_via), (merged_direct, shapes_direct) = _coalesced(via), _coalesced(direct)
    assert merged_via == merged_direct
    # A chat: its role chunk, the text, the usage event, [DONE]; a completion: no role chunk.
    assert len(merged_via) == (4 if path == CHAT_PATH else 3)
    text, usage = merged_via[-3], merged_via[-2]
    assert text["choices"][0]["finish_reason"] in {"length", "stop"}
    assert usage["choices"] == []
    assert 1 <= usage["usage"]["completion_tokens"] <= body["max_tokens"]
    # At most one text event per generated token; all but the last alike but for their text.
    for shapes in (shapes_via, shapes_direct):
        assert len(shapes) + 1 <= usage["usage"]["completion_tokens"]
    assert len({json.dumps(s, sort_keys=True) for s in shapes_via + shapes_direct}) <= 1


async def test_openai_client_works_against_the_gateway(
    gateway_server: Any, real_engine: RealEngine
) -> None:
    """The official openai client gets chat answers, streamed and not, and lists models."""
    server = await gateway_server(gateway_config(real_engine.url))
    client = openai.AsyncOpenAI(
        base_url=str(server.make_url("/v1")), api_key="unused", max_retries=0
    )
    try:
        models = await client.models.list()
        assert [m.id for m in models.data] == ["tiny"]
        chat = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0
        )
        assert chat.choices[0].message.content
        assert (chat.usage is not None and chat.usage.completion_tokens == 5) or chat.choices[
            0
        ].finish_reason == "stop"
        stream = await client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=5,
            temperature=0,
            stream=True,
        )
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(pieces) == chat.choices[0].message.content
        completion = await client.completions.create(
            model="tiny", prompt="Hello", max_tokens=3, temperature=0
        )
        assert completion.choices[0].text
    finally:
        await client.close()


async def test_kserve_prefix_reaches_the_same_engine(
    gateway_server: Any, real_engine: RealEngine
) -> None:
    """/openai/v1/... is the same engine path as /v1/..."""
    server = await gateway_server(gateway_config(real_engine.url))
    status, answer = await _json(base_url(server), "/openai/v1/completions", COMPLETION)
    assert status == 200
    assert answer["object"] == "text_completion"


async def _wait_running(engine: RealEngine, predicate: Any, timeout: float) -> float | None:
    """Seconds until vllm:num_requests_running satisfies predicate, or None at timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        running = await asyncio.to_thread(engine.metric, "vllm:num_requests_running")
        if predicate(running):
            return time.monotonic() - start
        await asyncio.sleep(0.05)
    return None


async def _drop_stream_after(base: str, seconds: float, engine: RealEngine) -> float:
    """Stream a long generation, drop it after `seconds`; returns what vLLM was running
    just before the drop."""
    body = {
        "model": "tiny",
        "prompt": "Once upon a time",
        "n": 64,
        "max_tokens": 480,
        "ignore_eos": True,
        "stream": True,
    }
    session = aiohttp.ClientSession()
    try:
        resp = await session.post(base + "/v1/completions", json=body)
        assert resp.status == 200
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await asyncio.wait_for(resp.content.readany(), timeout=10)
        running = await asyncio.to_thread(engine.metric, "vllm:num_requests_running")
        resp.close()  # drop the connection mid-stream
        return running
    finally:
        await session.close()


async def test_client_disconnect_stops_the_engine(
    gateway_server: Any, real_engine: RealEngine
) -> None:
    """A client that drops a long stream makes the engine go idle (vLLM's own metric)."""
    config = gateway_config(real_engine.url, defaults={"max_n": 64, "max_tokens_limit": 480})
    server = await gateway_server(config)
    assert await _wait_running(real_engine, lambda r: r == 0, 30) is not None
    running = await _drop_stream_after(base_url(server), 0.5, real_engine)
    assert running > 0, "the engine was not busy before the drop; the test proves nothing"
    went_idle = await _wait_running(real_engine, lambda r: r == 0, 10)
    assert went_idle is not None, "the engine kept generating for a client that left"
