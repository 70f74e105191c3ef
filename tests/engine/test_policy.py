"""Token policies enforced in front of the real vLLM (local exact counts, tiny model)."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.helpers import MODEL_DIR, base_url, gateway_config, post
from tests.real_engine import RealEngine

pytestmark = pytest.mark.engine

CTX = 512


def _config(engine: RealEngine, **policy: Any) -> Any:
    tiny = {"tokenizer": str(MODEL_DIR), "token_source": "local", **policy}
    return gateway_config(
        engine.url,
        defaults={"default_max_tokens": 40, "max_tokens_limit": 100},
        models={"tiny": tiny},
    )


async def _post(base: str, path: str, body: dict[str, Any]) -> tuple[int, Any, Any]:
    """Status, headers and the JSON answer (for a stream: the list of data events)."""
    answer = await post(base + path, body)
    if "events" in answer:
        return (
            answer["status"],
            answer["headers"],
            [event for event in answer["events"] if event != "[DONE]"],
        )
    return answer["status"], answer["headers"], answer["json"]


async def _engine_prompt_tokens(engine: RealEngine, body: dict[str, Any]) -> int:
    payload = {k: v for k, v in body.items() if k in {"model", "messages", "prompt"}}
    if "messages" in payload:
        payload["add_generation_prompt"] = True
    async with aiohttp.ClientSession() as s, s.post(engine.url + "/tokenize", json=payload) as r:
        return int((await r.json())["count"])


def _completion_tokens(answer: Any) -> int:
    if isinstance(answer, list):  # stream with include_usage: the last event has usage
        return int(answer[-1]["usage"]["completion_tokens"])
    return int(answer["usage"]["completion_tokens"])


CHAT = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "Count the stars, please."}],
    "ignore_eos": True,
    "temperature": 0,
}
COMPLETION = {
    "model": "tiny",
    "prompt": "Count the stars, please.",
    "ignore_eos": True,
    "temperature": 0,
}
ENDPOINTS = [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)]
STREAM = {"stream": True, "stream_options": {"include_usage": True}}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize(("path", "body"), ENDPOINTS, ids=["chat", "completion"])
async def test_missing_max_tokens_gets_the_bounded_default(
    gateway_server: Any, real_engine: RealEngine, path: str, body: dict[str, Any], stream: bool
) -> None:
    """No max_tokens: exactly min(default_max_tokens, context - prompt) tokens come back."""
    server = await gateway_server(_config(real_engine))
    base = base_url(server)
    request = {**body, **(STREAM if stream else {})}
    status, headers, answer = await _post(base, path, request)
    assert status == 200, answer
    assert _completion_tokens(answer) == 40
    assert headers["X-Vllm-Guard-Max-Tokens"] == "defaulted 40"


async def test_default_is_bounded_by_the_context_window(
    gateway_server: Any, real_engine: RealEngine
) -> None:
    """A long prompt leaves less room than the default: the rest of the window is given."""
    server = await gateway_server(
        _config(real_engine, default_max_tokens=200, max_tokens_limit=300)
    )
    body = {**CHAT, "messages": [{"role": "user", "content": "stars and moons " * 60}]}
    prompt = await _engine_prompt_tokens(real_engine, body)
    assert CTX - 200 < prompt < CTX, prompt
    status, headers, answer = await _post(base_url(server), "/v1/chat/completions", body)
    assert status == 200, answer
    assert answer["usage"]["prompt_tokens"] == prompt
    assert _completion_tokens(answer) == CTX - prompt
    assert headers["X-Vllm-Guard-Max-Tokens"] == f"defaulted {CTX - prompt}"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize(("path", "body"), ENDPOINTS, ids=["chat", "completion"])
async def test_clamp_over_the_policy_limit(
    gateway_server: Any, real_engine: RealEngine, path: str, body: dict[str, Any], stream: bool
) -> None:
    """on_exceed: clamp lowers max_tokens to the policy limit and says so."""
    server = await gateway_server(_config(real_engine, on_exceed="clamp"))
    request = {**body, "max_tokens": 300, **(STREAM if stream else {})}
    status, headers, answer = await _post(base_url(server), path, request)
    assert status == 200, answer
    assert _completion_tokens(answer) == 100
    assert headers["X-Vllm-Guard-Max-Tokens"] == "clamped 300->100"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize(("path", "body"), ENDPOINTS, ids=["chat", "completion"])
async def test_reject_over_the_policy_limit(
    gateway_server: Any, real_engine: RealEngine, path: str, body: dict[str, Any], stream: bool
) -> None:
    """on_exceed: reject answers 400 naming max_tokens, and the engine never sees it."""
    server = await gateway_server(_config(real_engine, on_exceed="reject"))
    before = real_engine.access_count(path)
    request = {**body, "max_tokens": 300, **(STREAM if stream else {})}
    status, _, answer = await _post(base_url(server), path, request)
    assert status == 400
    assert answer["error"]["param"] == "max_tokens"
    assert answer["error"]["type"] == "BadRequestError"
    assert "100" in answer["error"]["message"]
    assert real_engine.access_count(path) == before


@pytest.mark.parametrize(("on_exceed", "expect_status"), [("clamp", 200), ("reject", 400)])
async def test_output_that_overflows_the_window(
    gateway_server: Any, real_engine: RealEngine, on_exceed: str, expect_status: int
) -> None:
    """max_tokens that fits the policy but not the window beside the prompt: the engine
    would silently shorten it; the gateway clamps it and says so, or rejects it."""
    server = await gateway_server(_config(real_engine, on_exceed=on_exceed, max_tokens_limit=500))
    body = {**COMPLETION, "prompt": "stars and moons " * 40, "max_tokens": 500}
    prompt = await _engine_prompt_tokens(real_engine, body)
    assert prompt + 500 > CTX
    status, headers, answer = await _post(base_url(server), "/v1/completions", body)
    assert status == expect_status, answer
    if on_exceed == "clamp":
        assert _completion_tokens(answer) == CTX - prompt
        assert headers["X-Vllm-Guard-Max-Tokens"] == f"clamped 500->{CTX - prompt}"
    else:
        assert answer["error"]["param"] == "max_tokens"
        assert str(prompt) in answer["error"]["message"]


@pytest.mark.parametrize(("path", "body"), ENDPOINTS, ids=["chat", "completion"])
async def test_overlong_prompt_never_reaches_the_engine(
    gateway_server: Any, real_engine: RealEngine, path: str, body: dict[str, Any]
) -> None:
    """A prompt over the context window is refused by the gateway with the engine's error
    shape (param input_tokens); the engine's access log shows it never arrived."""
    server = await gateway_server(_config(real_engine))
    long = "stars and moons " * 400
    request = (
        {**body, "messages": [{"role": "user", "content": long}]}
        if "messages" in body
        else {**body, "prompt": long}
    )
    before = real_engine.access_count(path)
    status, _, answer = await _post(base_url(server), path, request)
    assert status == 400
    assert answer["error"]["param"] == "input_tokens"
    assert "maximum context length is 512" in answer["error"]["message"]
    assert real_engine.access_count(path) == before


async def test_max_prompt_tokens_names_the_policy_limit(
    gateway_server: Any, real_engine: RealEngine
) -> None:
    """A prompt within the window but over max_prompt_tokens is refused naming the policy."""
    server = await gateway_server(_config(real_engine, max_prompt_tokens=50))
    body = {**COMPLETION, "prompt": "stars and moons " * 40, "max_tokens": 5}
    status, _, answer = await _post(base_url(server), "/v1/completions", body)
    assert status == 400
    assert answer["error"]["param"] == "input_tokens"
    assert "50" in answer["error"]["message"]
    assert "512" not in answer["error"]["message"]


async def test_unknown_model_gets_vllms_404(gateway_server: Any, real_engine: RealEngine) -> None:
    """A model the engine does not serve: NotFoundError, param model, like vLLM."""
    server = await gateway_server(_config(real_engine))
    status, _, answer = await _post(
        base_url(server), "/v1/completions", {**COMPLETION, "model": "nope"}
    )
    assert status == 404
    assert answer["error"]["type"] == "NotFoundError"
    assert answer["error"]["param"] == "model"
    direct_status, _, direct = await _post(
        real_engine.url, "/v1/completions", {**COMPLETION, "model": "nope", "max_tokens": 3}
    )
    assert direct_status == 404
    assert direct["error"]["type"] == answer["error"]["type"]


async def test_report_mode_forwards_and_marks(gateway_server: Any, real_engine: RealEngine) -> None:
    """Report mode: an over-limit request is forwarded as sent and marked; a missing limit
    is still filled."""
    server = await gateway_server(_config(real_engine, mode="report"))
    base = base_url(server)
    status, headers, answer = await _post(
        base, "/v1/completions", {**COMPLETION, "max_tokens": 150}
    )
    assert status == 200
    assert _completion_tokens(answer) == 150
    assert headers["X-Vllm-Guard-Max-Tokens"] == "would-clamp 150->100"
    status, headers, answer = await _post(base, "/v1/completions", COMPLETION)
    assert status == 200
    assert _completion_tokens(answer) == 40
