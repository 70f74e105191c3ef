"""Property-based fuzzing of the two generation endpoints: random and mutated bodies (wrong
types, missing fields, huge numbers, deep nesting, invalid UTF-8, giant strings, non-object
JSON, wrong content types) against a gateway in front of the in-process engine emulator.

Whatever arrives, the gateway answers a 2xx or a 4xx in the OpenAI error envelope, never a
5xx (the emulator behind it is healthy, so no engine state excuses one), answers every request
within a bound, and keeps serving a normal request afterwards.

The emulator counts with the tiny model's tokenizer, as the gateway does, so admission and the
stand-in agree on every prompt length. Examples are driven from a worker thread
(`hypothesis.given` on a plain function) while the event loop serves the gateway, so that each
request has a timeout and the stack is checked after the last example.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from engine.emulator import EmulatorSettings, create_emulator_app
from tests.helpers import MODEL_DIR, base_url, error_envelope, gateway_config, run_fake_upstream

PATHS = ("/v1/chat/completions", "/v1/completions")
ANSWER_TIMEOUT_S = 60.0
"""A request not answered within this is a hang (the slowest fuzzed body takes about 1 s)."""
SETTINGS = settings(
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

CHAT = {
    "model": "tiny",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
    ],
    "max_tokens": 4,
}
COMPLETION = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 4}
FIELDS = (
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "best_of",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "tools",
    "tool_choice",
    "chat_template",
    "chat_template_kwargs",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "truncate_prompt_tokens",
    "documents",
    "reasoning_effort",
    "response_format",
    "logprobs",
    "seed",
    "stop",
    "ignore_eos",
    "prompt_embeds",
    "user",
)
CONTENT_TYPES = (
    "application/json",
    "application/json; charset=utf-8",
    "application/vnd.api+json",
    "",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/octet-stream",
    "application/json; charset=latin-1",
    "image/png",
)
ODD_VALUES: tuple[object, ...] = (
    10**30,
    -(10**30),
    2**63,
    -1,
    0,
    1.5,
    5.0,
    1e308,
    -0.0,
    float("inf"),
    float("-inf"),
    float("nan"),
    "nan",
    "NaN",
    "1e999",
    "",
    " ",
    "\x00",
    "\ud800",
    "\udfff\ud800",
    True,
    False,
    None,
    [],
    {},
    [None],
    {"": None},
    "tiny",
    "<|im_end|>",
    "{{ raise_exception('x') }}",
    "{% for m in messages %}{{ m.content }}{% endfor %}",
    [1, 2, 3],
    [[1], [2]],
    ["a", 1],
    [{"type": "text", "text": "hi"}],
    [{"type": "image_url", "image_url": {"url": "x"}}],
)

# -- strategies ---------------------------------------------------------------------------------

leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(ODD_VALUES),
)
json_values = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.one_of(st.sampled_from(FIELDS), st.text(max_size=8)), children, max_size=4
        )
    ),
    max_leaves=12,
)
message_values = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {
            "role": st.one_of(
                st.sampled_from(["user", "system", "assistant", "tool", "developer", "wizard"]),
                json_values,
            )
        },
        optional={
            "content": st.one_of(
                json_values,
                st.lists(
                    st.one_of(
                        json_values,
                        st.fixed_dictionaries(
                            {
                                "type": st.sampled_from(
                                    ["text", "input_text", "refusal", "thinking", "image_url", "x"]
                                ),
                                "text": json_values,
                            }
                        ),
                    )
                ),
                st.text(max_size=200),
            ),
            "tool_calls": json_values,
            "name": json_values,
            "tool_call_id": json_values,
            "reasoning": json_values,
        },
    ),
)


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    """A valid body with one to four fields replaced, removed, added or reshaped."""
    body: dict[str, Any] = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["set", "set", "drop", "message", "messages", "prompt"]))
        field = draw(st.one_of(st.sampled_from(FIELDS), st.text(max_size=8)))
        if kind == "set":
            body[field] = draw(json_values)
        elif kind == "drop":
            body.pop(draw(st.sampled_from(sorted(body) or ["model"])), None)
        elif kind == "message" and isinstance(body.get("messages"), list) and body["messages"]:
            index = draw(st.integers(0, len(body["messages"]) - 1))
            body["messages"][index] = draw(message_values)
        elif kind == "messages":
            body["messages"] = draw(st.lists(message_values, max_size=5))
        else:
            body["prompt"] = draw(
                st.one_of(
                    st.text(max_size=300),
                    st.lists(st.text(max_size=20), max_size=20),
                    st.lists(st.integers(-5, 2**40), max_size=20),
                    st.lists(st.lists(st.integers(-5, 60_000), max_size=10), max_size=20),
                    json_values,
                )
            )
    return body


def encode(body: object, ascii_only: bool) -> bytes:
    """JSON text of `body`: escaped, or raw UTF-8 where lone surrogates become invalid bytes."""
    text = json.dumps(body, ensure_ascii=ascii_only, allow_nan=True)
    return text.encode("utf-8", "surrogatepass")


@dataclass(frozen=True)
class Sent:
    path: str
    body: bytes
    content_type: str | None = "application/json"

    def __repr__(self) -> str:  # a failing example is printed; megabytes of it help no one
        return (
            f"Sent({self.path!r}, {self.body[:300]!r}... ({len(self.body)} bytes), "
            f"{self.content_type!r})"
        )

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis' printer
        printer.text(repr(self))


@st.composite
def mutated_requests(draw: st.DrawFn) -> Sent:
    path = draw(st.sampled_from(PATHS))
    base = CHAT if path == PATHS[0] else COMPLETION
    body = draw(mutated(base))
    return Sent(path, encode(body, draw(st.booleans())))


@st.composite
def raw_requests(draw: st.DrawFn) -> Sent:
    """Bytes that are not a JSON object, or not valid text at all, or sent as another type."""
    path = draw(st.sampled_from(PATHS))
    valid = encode(CHAT if path == PATHS[0] else COMPLETION, True)
    kind = draw(
        st.sampled_from(
            [
                "binary",
                "splice",
                "truncate",
                "non-object",
                "utf16",
                "bad-utf8-string",
                "content-type",
            ]
        )
    )
    if kind == "binary":
        raw = draw(st.binary(max_size=300))
    elif kind == "splice":
        at = draw(st.integers(0, len(valid)))
        raw = valid[:at] + draw(st.binary(min_size=1, max_size=8)) + valid[at:]
    elif kind == "truncate":
        raw = valid[: draw(st.integers(0, len(valid) - 1))]
    elif kind == "non-object":
        raw = encode(draw(st.one_of(leaves, st.lists(json_values, max_size=3))), True)
    elif kind == "utf16":
        raw = json.dumps(draw(mutated(CHAT if path == PATHS[0] else COMPLETION))).encode(
            draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32"]))
        )
    elif kind == "bad-utf8-string":
        junk = draw(
            st.sampled_from(
                [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80", b"\xe2\x82", b"\x80"]
            )
        )
        raw = valid.replace(b"Hello" if path == PATHS[0] else b"Once", junk)
    else:
        raw = valid
    content_type = (
        draw(st.one_of(st.none(), st.sampled_from(CONTENT_TYPES)))
        if kind == "content-type"
        else draw(st.sampled_from(CONTENT_TYPES[:4]))
    )
    return Sent(path, raw, content_type)


def _nest(depth: int, leaf: object, as_object: bool) -> str:
    inner = json.dumps(leaf)
    if as_object:
        return '{"a":' * depth + inner + "}" * depth
    return "[" * depth + inner + "]" * depth


@st.composite
def extreme_requests(draw: st.DrawFn) -> Sent:
    """Deep nesting, giant strings, huge numbers and huge lists, in any field."""
    path = draw(st.sampled_from(PATHS))
    base = CHAT if path == PATHS[0] else COMPLETION
    kind = draw(st.sampled_from(["deep", "giant", "number", "many"]))
    field = draw(
        st.sampled_from(
            [
                "messages",
                "prompt",
                "tools",
                "chat_template_kwargs",
                "user",
                "max_tokens",
                "model",
                "chat_template",
                "stream_options",
                "content",
                "root",
            ]
        )
    )
    if kind == "deep":
        depth = draw(st.sampled_from([50, 200, 900, 1000, 3000, 100_000]))
        value_text = _nest(depth, draw(leaves), draw(st.booleans()))
    elif kind == "giant":
        unit = draw(st.sampled_from(["a", " ", "\n", "é", "🙂", "ab ", "<s>", "{{"]))
        size = draw(st.sampled_from([100_000, 1_000_000]))
        value_text = json.dumps(unit * (size // len(unit.encode())))
    elif kind == "number":
        value_text = draw(
            st.sampled_from(
                [
                    "1" + "0" * 5000,
                    "-1" + "0" * 400,
                    "1e400",
                    "-1e400",
                    "1" * 4301,
                    "0.0000001",
                    "NaN",
                    "Infinity",
                    "-Infinity",
                    "1E-400",
                ]
            )
        )
    else:
        count = draw(st.sampled_from([1_000, 100_000]))
        item = draw(st.sampled_from(['"x"', "1", '{"role": "user", "content": "x"}', "[1]"]))
        value_text = "[" + ",".join([item] * count) + "]"
    placeholder = "__VALUE__"
    if field == "root":
        text = value_text
    elif field == "content":
        body = {**base, "messages": [{"role": "user", "content": placeholder}]}
        text = json.dumps(body).replace(json.dumps(placeholder), value_text)
    else:
        text = json.dumps({**base, field: placeholder}).replace(json.dumps(placeholder), value_text)
    return Sent(path, text.encode("utf-8", "surrogatepass"))


# -- the stack ----------------------------------------------------------------------------------


@dataclass
class Stack:
    base: str
    session: aiohttp.ClientSession
    loop: asyncio.AbstractEventLoop

    async def send(self, sent: Sent) -> tuple[int, CIMultiDict[str], bytes]:
        headers = {} if sent.content_type is None else {"Content-Type": sent.content_type}
        async with self.session.post(
            self.base + sent.path,
            data=io.BytesIO(sent.body),
            headers=headers,
            skip_auto_headers=() if headers else ("Content-Type",),
        ) as resp:
            return resp.status, CIMultiDict(resp.headers), await resp.read()

    def send_from_thread(self, sent: Sent) -> tuple[int, CIMultiDict[str], bytes]:
        future = asyncio.run_coroutine_threadsafe(
            asyncio.wait_for(self.send(sent), ANSWER_TIMEOUT_S), self.loop
        )
        return future.result(ANSWER_TIMEOUT_S + 5)


@pytest.fixture
async def stack(gateway_server: Any) -> AsyncIterator[Stack]:
    """The emulator (tiny tokenizer) and a gateway in front of it, counting locally."""
    if not (MODEL_DIR / "tokenizer.json").is_file():
        pytest.fail("models/tiny is missing: run `make model` (make test does)")
    emulator_app = create_emulator_app(EmulatorSettings(tokenizer=MODEL_DIR))
    emulator: TestServer = await run_fake_upstream(emulator_app)
    config = gateway_config(
        base_url(emulator),
        defaults={"default_max_tokens": 8, "max_tokens_limit": 64},
        models={"tiny": {"tokenizer": str(MODEL_DIR), "token_source": "local"}},
    )
    gateway = await gateway_server(config, timeout=30)
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=ANSWER_TIMEOUT_S)
    ) as session:
        yield Stack(base_url(gateway), session, asyncio.get_running_loop())
    await emulator.close()


def check_answer(sent: Sent, status: int, headers: CIMultiDict[str], raw: bytes) -> None:
    """A 2xx, or a 4xx in the OpenAI envelope; never a 5xx."""
    assert status < 500, f"{status} for {sent!r}: {raw[:500]!r}"
    assert headers.get("X-Request-Id")
    if status < 300:
        if "text/event-stream" in headers.get("Content-Type", ""):
            assert raw.rstrip().endswith(b"data: [DONE]"), raw[-300:]
        else:
            assert "choices" in json.loads(raw)
        return
    error = error_envelope(json.loads(raw), status)
    assert isinstance(error["type"], str)
    assert error["param"] is None or isinstance(error["param"], str)


async def still_serving(stack: Stack) -> None:
    for path, body in zip(PATHS, (CHAT, COMPLETION), strict=True):
        status, _, raw = await stack.send(Sent(path, encode(body, True)))
        assert status == 200, raw
        assert json.loads(raw)["usage"]["completion_tokens"] == 4


def _chat_bytes(content: bytes) -> bytes:
    return (
        b'{"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "'
        + content
        + b'"}]}'
    )


REGRESSIONS = [
    # A lone surrogate, as UTF-8 bytes (json.loads(bytes) decodes them with surrogatepass)
    # and as a JSON escape: once a 500 (the tokenizer and the UTF-8 encoder refuse them).
    Sent(PATHS[0], _chat_bytes(b"\xed\xa0\x80 there")),
    Sent(PATHS[0], _chat_bytes(b"\\ud800 there")),
    Sent(PATHS[1], b'{"model": "tiny", "max_tokens": 4, "prompt": "a\\udfff"}'),
    # Nesting past the JSON parser's recursion limit: once a 500 (RecursionError); just under
    # it, the engine's own parser failed instead (a bare 500, a 502 here).
    Sent(PATHS[0], b"[" * 100_000 + b"]" * 100_000),
    Sent(
        PATHS[0],
        _chat_bytes(b"x").replace(
            b'"max_tokens"', b'"user": ' + b"[" * 950 + b"]" * 950 + b', "max_tokens"'
        ),
    ),
    # A completions body with a stray messages field was counted as a chat: one count for two
    # prompts, a 500 (and a way around max_prompt_tokens).
    Sent(
        PATHS[1],
        b'{"model": "tiny", "prompt": ["", ""], "max_tokens": 4, "messages": [{"role": "user"}]}',
    ),
    # A forward over 1 MB: aiohttp's ResourceWarning for a large bytes body, once a 500.
    Sent(
        PATHS[0],
        _chat_bytes(b"hi").replace(
            b'"max_tokens"', b'"user": "' + b"u" * 1_100_000 + b'", "max_tokens"'
        ),
    ),
]
"""Bodies that once broke the gateway; every fuzzing test tries them first."""


async def fuzz(stack: Stack, strategy: st.SearchStrategy[Sent], examples: int) -> None:
    seen: list[int] = []

    @settings(SETTINGS, max_examples=examples)
    @given(sent=strategy)
    @_with_examples(REGRESSIONS)
    def run(sent: Sent) -> None:
        status, headers, raw = stack.send_from_thread(sent)
        seen.append(status)
        check_answer(sent, status, headers, raw)

    runner: Callable[[], None] = run
    await asyncio.to_thread(runner)
    assert len(seen) >= examples // 2
    await still_serving(stack)


def _with_examples(sents: list[Sent]) -> Callable[[Callable[[Sent], None]], Callable[[Sent], None]]:
    def decorate(test: Callable[[Sent], None]) -> Callable[[Sent], None]:
        for sent in reversed(sents):
            test = example(sent=sent)(test)
        return test

    return decorate


# -- tests --------------------------------------------------------------------------------------


async def test_mutated_bodies(stack: Stack) -> None:
    """Valid chat and completion bodies with fields replaced by random JSON, removed, added or
    reshaped: every answer is a 2xx or an enveloped 4xx, and the gateway keeps serving."""
    await fuzz(stack, mutated_requests(), 900)


async def test_raw_bytes(stack: Stack) -> None:
    """Random bytes, spliced and truncated JSON, non-object JSON, UTF-16 and invalid UTF-8, and
    wrong content types: each is an enveloped 4xx (or served, when it is valid after all)."""
    await fuzz(stack, raw_requests(), 500)


async def test_extremes(stack: Stack) -> None:
    """Deep nesting, megabyte strings, huge numbers and huge lists in any field are answered
    promptly with a 2xx or an enveloped 4xx, and the gateway keeps serving."""
    await fuzz(stack, extreme_requests(), 100)
