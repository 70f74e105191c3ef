"""TokenCounter: exact counts from the local tokenizer or the engine's /tokenize (a fake of it
here), cheap bounds, vLLM's truncation, and client mistakes as BadRequest."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from engine.chat_prepare import PreparedChat
from engine.tokenization import PromptTokenizer
from gateway.config import ConfigError, Policy, TokenSource
from gateway.errors import BadGateway, BadRequest
from gateway.tokens import INLINE_CHARS, PromptCount, TokenCounter, TokenCounters
from tests.helpers import MODEL_DIR
from tests.token_corpus import LONG, MEDIUM, cases
from tests.token_corpus import template as template_text

MAX_MODEL_LEN = 512
USER = [{"role": "user", "content": "Hello there"}]

# Chat requests of the corpus that count without truncation, rejection or the engine.
PLAIN_CHATS = [
    c
    for c in cases()
    if c["kind"] == "chat"
    and not c["id"].startswith(("bad-", "unsupported-"))
    and "truncate_prompt_tokens" not in c["body"]
]


class FakeTokenize:
    """The engine's POST /tokenize: counts with the same tokenizer, or gives a set answer.
    Keeps every payload it was sent."""

    def __init__(self, tok: PromptTokenizer, answer: Mapping[str, object] | None = None):
        self.tok = tok
        self.answer = answer
        self.payloads: list[dict[str, object]] = []

    async def __call__(self, payload: dict[str, object]) -> Mapping[str, object]:
        self.payloads.append(payload)
        if self.answer is not None:
            return self.answer
        if "messages" in payload:
            kwargs: Any = payload.get("chat_template_kwargs")
            template: Any = payload.get("chat_template")
            ids = self.tok.encode_chat(
                payload["messages"],
                add_generation_prompt=bool(payload["add_generation_prompt"]),
                continue_final_message=bool(payload["continue_final_message"]),
                tools=payload.get("tools"),
                chat_template=template,
                chat_template_kwargs=kwargs,
                add_special_tokens=bool(payload["add_special_tokens"]),
            )
        else:
            ids = self.tok.encode_completion(
                str(payload["prompt"]), bool(payload["add_special_tokens"])
            )
        return {"count": len(ids), "max_model_len": MAX_MODEL_LEN, "tokens": ids}


def local(tok: PromptTokenizer, remote: FakeTokenize | None = None) -> TokenCounter:
    return TokenCounter("tiny", tokenizer=tok, remote=remote)


def engine(
    tok: PromptTokenizer, answer: Mapping[str, object] | None = None
) -> tuple[TokenCounter, FakeTokenize]:
    fake = FakeTokenize(tok, answer)
    return TokenCounter("tiny", tokenizer=None, remote=fake), fake


NO_LIMIT = 10**9
"""A threshold no bound reaches: `count_*_within` answers with the cheap bound wherever the
gateway can make one."""


async def exact_chat(
    counter: TokenCounter, body: Mapping[str, object], max_model_len: int | None = None
) -> int:
    """A chat's exact count, through admission's API (no threshold: always exact)."""
    count = await counter.count_chat_within(body, None, max_model_len=max_model_len)
    assert count.exact
    return count.tokens


async def exact_prompts(
    counter: TokenCounter, body: Mapping[str, object], max_model_len: int | None = None
) -> list[int]:
    """A completions request's exact count per prompt, through admission's API."""
    counts = await counter.count_completion_within(body, None, max_model_len=max_model_len)
    assert all(c.exact for c in counts)
    return [c.tokens for c in counts]


async def within(
    counter: TokenCounter,
    body: Mapping[str, object],
    limit: int | None,
    max_model_len: int | None = None,
) -> list[PromptCount]:
    """Per prompt, what admission's API answers for `body` at `limit` (a chat when it has
    messages, as the tables here are written)."""
    if "messages" in body:
        return [await counter.count_chat_within(body, limit, max_model_len=max_model_len)]
    return await counter.count_completion_within(body, limit, max_model_len=max_model_len)


def _chat_ids(tok: PromptTokenizer, body: Mapping[str, Any]) -> list[int]:
    kwargs = dict(body.get("chat_template_kwargs") or {})
    if body.get("documents") is not None:
        kwargs["documents"] = body["documents"]
    return tok.encode_chat(
        body["messages"],
        add_generation_prompt=body.get("add_generation_prompt", True),
        continue_final_message=body.get("continue_final_message", False),
        tools=body.get("tools"),
        chat_template=body.get("chat_template"),
        chat_template_kwargs=kwargs,
        add_special_tokens=body.get("add_special_tokens", False),
        reasoning_effort=body.get("reasoning_effort"),
    )


@pytest.mark.parametrize("case", PLAIN_CHATS, ids=[c["id"] for c in PLAIN_CHATS])
async def test_local_and_engine_sources_agree(tok: PromptTokenizer, case: dict[str, Any]) -> None:
    """Both sources give PromptTokenizer's count for every plain chat of the corpus; the
    /tokenize payload carries documents and reasoning_effort as template kwargs."""
    expected = len(_chat_ids(tok, case["body"]))
    assert await exact_chat(local(tok), case["body"]) == expected
    counter, fake = engine(tok)
    assert await exact_chat(counter, case["body"]) == expected
    assert fake.payloads[0]["model"] == "tiny"


async def test_completion_prompt_shapes(tok: PromptTokenizer) -> None:
    """A string, strings, token ids and token-id lists are counted prompt by prompt; token ids
    count as their length and never go to the engine."""
    shapes: list[tuple[str | list[Any], list[int]]] = [
        ("Once upon a time", [len(tok.encode_completion("Once upon a time"))]),
        (["a b", "c"], [len(tok.encode_completion("a b")), len(tok.encode_completion("c"))]),
        ([5, 6, 7], [3]),
        ([[1, 2], [3], []], [2, 1, 0]),
    ]
    for prompt, expected in shapes:
        assert await exact_prompts(local(tok), {"prompt": prompt}) == expected
        counter, fake = engine(tok)
        assert await exact_prompts(counter, {"prompt": prompt}) == expected
        strings = [prompt] if isinstance(prompt, str) else [p for p in prompt if isinstance(p, str)]
        assert [p["prompt"] for p in fake.payloads] == strings
    no_bos = await exact_prompts(
        local(tok), {"prompt": "Once upon a time", "add_special_tokens": False}
    )
    assert no_bos == [len(tok.encode_completion("Once upon a time")) - 1]


@pytest.mark.parametrize(
    ("body", "max_model_len", "expected"),
    [
        ({"messages": [{"role": "user", "content": MEDIUM}], "truncate_prompt_tokens": 7}, None, 7),
        ({"messages": [{"role": "user", "content": LONG}], "truncate_prompt_tokens": -1}, 512, 512),
        (
            {
                "messages": [{"role": "user", "content": LONG}],
                "truncate_prompt_tokens": -1,
                "max_tokens": 10,
            },
            512,
            511,
        ),
        ({"prompt": LONG, "truncate_prompt_tokens": -1}, 512, 511),
        ({"prompt": LONG, "truncate_prompt_tokens": -1, "max_tokens": None}, 512, 511),
        ({"prompt": [[1, 2, 3, 4], [5]], "truncate_prompt_tokens": 2}, 512, 2),
        ({"prompt": "short", "truncate_prompt_tokens": 100}, 512, None),
    ],
    ids=[
        "chat-k",
        "chat-minus-one",
        "chat-minus-one-limited",
        "cmpl-minus-one",
        "cmpl-null-max-tokens",
        "cmpl-ids",
        "cmpl-k-above-count",
    ],
)
async def test_truncation_is_reflected(
    tok: PromptTokenizer, body: dict[str, Any], max_model_len: int | None, expected: int | None
) -> None:
    """truncate_prompt_tokens: k keeps k tokens; -1 keeps the window (less one when the request
    has an output limit, as vLLM's max_truncation_tokens)."""
    counter = local(tok)
    counts = [c.tokens for c in await within(counter, body, None, max_model_len)]
    if expected is None:
        assert counts == [len(tok.encode_completion("short"))]
    else:
        assert max(counts) == expected


async def test_truncation_errors_and_unknown_window(tok: PromptTokenizer) -> None:
    """k over the window is vLLM's 400; -1 with the window unknown leaves the count whole."""
    body = {"messages": [{"role": "user", "content": LONG}], "truncate_prompt_tokens": 600}
    with pytest.raises(BadRequest) as err:
        await exact_chat(local(tok), body, max_model_len=MAX_MODEL_LEN)
    assert err.value.param == "truncate_prompt_tokens"
    whole = await exact_chat(local(tok), {"messages": body["messages"]})
    minus_one = {"messages": body["messages"], "truncate_prompt_tokens": -1}
    assert await exact_chat(local(tok), minus_one) == whole


@pytest.mark.parametrize("case", cases(), ids=[c["id"] for c in cases()])
async def test_bounds_are_never_below_exact_counts(
    tok: PromptTokenizer, case: dict[str, Any]
) -> None:
    """For every request of the corpus, the cheap bound admission may take (a threshold no
    bound reaches) is at least the exact count (no threshold); what only the engine counts is
    exact either way, and a request the exact count refuses is refused by the bound too."""
    counter = local(tok, FakeTokenize(tok, {"count": 1}))
    refused: BadRequest | None
    try:
        exact = await within(counter, case["body"], None, MAX_MODEL_LEN)
    except BadRequest as err:
        refused = err
    else:
        refused = None
    if refused is not None:
        with pytest.raises(BadRequest) as bound_err:
            await within(counter, case["body"], NO_LIMIT, MAX_MODEL_LEN)
        assert bound_err.value.param == refused.param
        return
    bounds = await within(counter, case["body"], NO_LIMIT, MAX_MODEL_LEN)
    assert all(e.exact for e in exact)
    assert len(bounds) == len(exact)
    for bound, count in zip(bounds, exact, strict=True):
        assert bound.tokens >= count.tokens
        assert bound.exact is (bound.source != "local")  # a local count took the bound


async def test_within_counts_exactly_only_when_the_bound_could_matter(tok: PromptTokenizer) -> None:
    """count_*_within answers with the bound when it is at most the limit, else exactly."""
    body = {"messages": USER}
    exact = await exact_chat(local(tok), body)
    loose = await local(tok).count_chat_within(body, 10_000)
    assert loose == PromptCount(loose.tokens, False, "local")
    assert loose.tokens >= exact
    assert await local(tok).count_chat_within(body, 1) == PromptCount(exact, True, "local")
    counts = await local(tok).count_completion_within({"prompt": ["a", LONG]}, 100)
    assert [c.exact for c in counts] == [False, True]
    ids = await local(tok).count_completion_within({"prompt": [[1, 2]]}, 100)
    assert ids == [PromptCount(2, True, "ids")]


BAD_BODIES: list[tuple[dict[str, Any], str]] = [
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"messages": [{"content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": [7]}]}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": USER, "tools": [{"function": {}}]}, "tools"),
    ({"messages": USER, "tools": {"a": 1}}, "tools"),
    ({"messages": USER, "add_generation_prompt": "maybe"}, "add_generation_prompt"),
    ({"messages": USER, "add_special_tokens": None}, "add_special_tokens"),
    ({"messages": USER, "continue_final_message": True}, "messages"),
    ({"messages": USER, "truncate_prompt_tokens": -3}, "truncate_prompt_tokens"),
    ({"messages": USER, "truncate_prompt_tokens": "x"}, "truncate_prompt_tokens"),
    ({"messages": USER, "chat_template": 5}, "chat_template"),
    ({"messages": USER, "chat_template_kwargs": [1]}, "chat_template_kwargs"),
    ({"messages": USER, "documents": [1]}, "documents"),
    ({"messages": USER, "reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"messages": USER, "chat_template": "{{ raise_exception('no') }}"}, "messages"),
    ({"prompt": []}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [1, -1]}, "prompt"),
    ({"prompt": [[1], "a"]}, "prompt"),
    ({"prompt": "x", "add_special_tokens": 2}, "add_special_tokens"),
]


@pytest.mark.parametrize(
    ("body", "param"), BAD_BODIES, ids=[f"{i}-{p}" for i, (_, p) in enumerate(BAD_BODIES)]
)
async def test_malformed_bodies_are_bad_requests(
    tok: PromptTokenizer, body: dict[str, Any], param: str
) -> None:
    """Malformed structures become BadRequest naming the parameter, never another error,
    whether admission takes the cheap bound or counts exactly."""
    counter = local(tok, FakeTokenize(tok, {"count": 1}))
    for limit in (None, NO_LIMIT):
        with pytest.raises(BadRequest) as err:
            await within(counter, body, limit, MAX_MODEL_LEN)
        assert err.value.param == param
        assert err.value.message


async def test_what_the_local_path_cannot_count_goes_to_the_engine(tok: PromptTokenizer) -> None:
    """An image part is counted by the engine even with a local tokenizer; with no engine to
    ask it is a BadRequest that says why."""
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is it?"},
                    {"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}},
                ],
            }
        ],
        "documents": [{"title": "t", "text": "x"}],
        "reasoning_effort": "low",
    }
    fake = FakeTokenize(tok, {"count": 42, "max_model_len": MAX_MODEL_LEN})
    counter = local(tok, fake)
    assert await counter.count_chat_within(body, NO_LIMIT) == PromptCount(42, True, "engine")
    assert await exact_chat(counter, body) == 42
    assert fake.payloads[0]["chat_template_kwargs"] == {
        "documents": [{"title": "t", "text": "x"}],
        "reasoning_effort": "low",
        "enable_thinking": True,
    }
    with pytest.raises(BadRequest, match="cannot be counted"):
        await exact_chat(local(tok), body)


@pytest.mark.parametrize(
    ("answer", "error", "param"),
    [
        (
            {
                "error": {
                    "message": "bad chat",
                    "type": "BadRequestError",
                    "param": "messages",
                    "code": 400,
                }
            },
            BadRequest,
            "messages",
        ),
        (
            {"object": "error", "message": "old style", "type": "BadRequestError", "code": 400},
            BadRequest,
            None,
        ),
        (
            {"error": {"message": "boom", "type": "InternalServerError", "code": 500}},
            BadGateway,
            None,
        ),
        ({"tokens": []}, BadGateway, None),
        ({"count": "12"}, BadGateway, None),
    ],
)
async def test_engine_answers_without_a_count(
    tok: PromptTokenizer, answer: dict[str, Any], error: type[Exception], param: str | None
) -> None:
    """An engine 400 is the client's BadRequest with the engine's message; anything else
    without a count is a BadGateway."""
    counter, _ = engine(tok, answer)
    with pytest.raises(error) as err:
        await exact_chat(counter, {"messages": USER})
    if isinstance(err.value, BadRequest):
        assert err.value.param == param


async def test_the_endpoint_decides_what_is_counted(tok: PromptTokenizer) -> None:
    """A completions body with a stray `messages` field (vLLM ignores it there) is counted by
    its prompts, one count each; a chat body by its messages."""
    prompts = ["one prompt", LONG]
    body = {"prompt": prompts, "messages": USER}
    expected = [len(tok.encode_completion(p)) for p in prompts]
    counter = local(tok)
    assert await exact_prompts(counter, body) == expected
    bounds = await counter.count_completion_within(body, NO_LIMIT)
    assert len(bounds) == 2
    assert all(b.tokens >= e for b, e in zip(bounds, expected, strict=True))
    chat = {"messages": USER, "prompt": LONG}
    assert await exact_chat(counter, chat) == len(_chat_ids(tok, chat))


async def test_engine_source_bounds(tok: PromptTokenizer) -> None:
    """Without a local tokenizer no bound is made up: even past every threshold, token-id
    prompts count as their length without the engine, and text is counted by the engine."""
    counter, fake = engine(tok)
    ids = await counter.count_completion_within({"prompt": [[1, 2], [3]]}, NO_LIMIT)
    assert ids == [PromptCount(2, True, "ids"), PromptCount(1, True, "ids")]
    assert fake.payloads == []
    text = await counter.count_completion_within({"prompt": "text"}, NO_LIMIT)
    assert text == [PromptCount(len(tok.encode_completion("text")), True, "engine")]
    assert [p["prompt"] for p in fake.payloads] == ["text"]
    chat = await counter.count_chat_within({"messages": USER}, NO_LIMIT)
    assert chat == PromptCount(len(_chat_ids(tok, {"messages": USER})), True, "engine")
    assert len(fake.payloads) == 2


class ThreadRecordingTokenizer(PromptTokenizer):
    """The real tokenizer, noting the thread each encoding runs in."""

    threads: list[int]

    def encode_completion(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        self.threads.append(threading.get_ident())
        return super().encode_completion(prompt, add_special_tokens)


async def test_long_texts_are_counted_off_the_event_loop() -> None:
    """Short requests count inline; long ones in a worker thread, with the same result."""
    tok = ThreadRecordingTokenizer.from_dir(MODEL_DIR)
    tok.threads = []
    counter = TokenCounter("tiny", tokenizer=tok, remote=None, inline_chars=1000)
    loop_thread = threading.get_ident()
    await exact_chat(counter, {"messages": USER})
    await exact_prompts(counter, {"prompt": "short"})
    assert tok.threads == [loop_thread, loop_thread]
    long_chat = await exact_chat(counter, {"messages": [{"role": "user", "content": LONG}]})
    await exact_prompts(counter, {"prompt": ["x", LONG]})
    assert loop_thread not in tok.threads[2:]
    assert long_chat == len(_chat_ids(tok, {"messages": [{"role": "user", "content": LONG}]}))


class ConcurrencyRecordingTokenizer(PromptTokenizer):
    """The real tokenizer, noting how many encodings run at once (each made to last 50 ms)."""

    lock: threading.Lock
    running: int
    most: int

    def encode_completion(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(0.05)
            return super().encode_completion(prompt, add_special_tokens)
        finally:
            with self.lock:
                self.running -= 1


@pytest.mark.parametrize("threads", [1, 2])
async def test_long_prompts_are_counted_in_the_configured_threads_at_most(threads: int) -> None:
    """Eight long prompts at once are counted by at most `count_threads` threads (the rest
    queue), each with its exact count; the two counters of one `TokenCounters` share them."""
    tok = ConcurrencyRecordingTokenizer.from_dir(MODEL_DIR)
    tok.lock, tok.running, tok.most = threading.Lock(), 0, 0
    counters = TokenCounters(None, threads=threads)
    made = [counters.counter(m, Policy(tokenizer=str(MODEL_DIR))) for m in ("tiny", "tiny-2")]
    for counter in made:
        counter.tokenizer = tok
    prompts = [f"{i} " + " ".join([LONG] * 3) for i in range(8)]
    assert min(map(len, prompts)) > INLINE_CHARS
    try:
        counts = await asyncio.gather(
            *(exact_prompts(made[i % 2], {"prompt": p}) for i, p in enumerate(prompts))
        )
    finally:
        await counters.close()
    assert tok.most == threads
    assert counts == [[len(tok.encode_completion(p))] for p in prompts]


async def test_a_count_still_queued_is_dropped_with_its_request() -> None:
    """With one thread busy, a second long prompt's count waits; when its request is cancelled
    (the client left, the deadline passed) it is never made."""
    tok = ConcurrencyRecordingTokenizer.from_dir(MODEL_DIR)
    tok.lock, tok.running, tok.most = threading.Lock(), 0, 0
    counters = TokenCounters(None, threads=1)
    counter = counters.counter("tiny", Policy(tokenizer=str(MODEL_DIR)))
    counter.tokenizer = tok
    seen: list[str] = []
    real = tok.encode_completion

    def noting(prompt: str, add_special_tokens: bool = True) -> list[int]:
        seen.append(prompt[:1])
        return real(prompt, add_special_tokens)

    tok.encode_completion = noting  # type: ignore[method-assign]
    long = " ".join([LONG] * 3)
    try:
        first = asyncio.create_task(exact_prompts(counter, {"prompt": "a" + long}))
        while not seen:  # the first count is running
            await asyncio.sleep(0.005)
        queued = asyncio.create_task(exact_prompts(counter, {"prompt": "b" + long}))
        await asyncio.sleep(0.01)
        queued.cancel()
        await first
        third = await exact_prompts(counter, {"prompt": "c" + long})
    finally:
        await counters.close()
    assert queued.cancelled()
    assert seen == ["a", "c"]
    assert third == [len(real("c" + long))]


class PlainBoundRecordingTokenizer(ThreadRecordingTokenizer):
    """Also notes the thread of each plain chat's bound and of each prepared conversation."""

    bound_threads: list[int]
    prepared: int

    def plain_chat_bound(self, messages: object, add_generation_prompt: bool) -> int | None:
        self.bound_threads.append(threading.get_ident())
        return super().plain_chat_bound(messages, add_generation_prompt)

    def prepare_chat(self, *args: Any, **kwargs: Any) -> PreparedChat:
        self.prepared += 1
        return super().prepare_chat(*args, **kwargs)


async def test_a_long_plain_chat_far_from_its_limits_is_bounded_on_the_loop() -> None:
    """A long plain chat whose bound settles the decision is bounded on the event loop, with
    no worker thread and no conversation prepared (a few lengths of its messages); the same
    chat near its limit is counted exactly, off the loop."""
    tok = PlainBoundRecordingTokenizer.from_dir(MODEL_DIR)
    tok.threads, tok.bound_threads, tok.prepared = [], [], 0
    counter = TokenCounter("tiny", tokenizer=tok, remote=None, inline_chars=1000)
    loop_thread = threading.get_ident()
    body = {"messages": [{"role": "user", "content": LONG}]}
    await exact_chat(counter, body)  # makes the template's setup, as a first request does
    exact = len(_chat_ids(tok, body))
    tok.threads, tok.bound_threads, tok.prepared = [], [], 0
    far = await counter.count_chat_within(body, NO_LIMIT)
    assert not far.exact
    assert far.tokens >= exact
    assert tok.bound_threads == [loop_thread]
    assert tok.prepared == 0
    assert tok.threads == []
    near = await counter.count_chat_within(body, exact - 1)  # no bound can settle it
    assert near == PromptCount(exact, True, "local")
    assert tok.threads
    assert loop_thread not in tok.threads


async def test_what_may_render_slowly_is_counted_off_the_event_loop() -> None:
    """A short chat with a template of its own (whose loops may run long), or with long
    documents, is counted in a worker thread; the model's own template inline."""
    tok = ThreadRecordingTokenizer.from_dir(MODEL_DIR)
    tok.threads = []
    expected = len(tok.encode_completion("Hello there" * 3, add_special_tokens=False))
    tok.threads.clear()
    counter = TokenCounter("tiny", tokenizer=tok, remote=None, inline_chars=1000)
    loop_thread = threading.get_ident()
    await exact_chat(counter, {"messages": USER})
    assert tok.threads == [loop_thread]
    template = "{% for i in range(3) %}{{ messages[0].content }}{% endfor %}"
    assert await exact_chat(counter, {"messages": USER, "chat_template": template}) == expected
    await exact_chat(counter, {"messages": USER, "documents": [{"title": "t", "text": LONG}]})
    assert tok.threads[0] == loop_thread
    assert loop_thread not in tok.threads[1:]
    assert len(tok.threads) == 3


def _inexact_dir(tmp_path: Path) -> Path:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MODEL_DIR / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["tokenizer_class"] = "LlamaTokenizer"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize(
    ("source", "folder", "expected"),
    [
        (TokenSource.AUTO, "tiny", "local"),
        (TokenSource.AUTO, "missing", "engine"),
        (TokenSource.AUTO, None, "engine"),
        (TokenSource.AUTO, "inexact", "engine"),
        (TokenSource.LOCAL, "tiny", "local"),
        (TokenSource.LOCAL, "inexact", "local"),
        (TokenSource.LOCAL, "missing", ConfigError),
        (TokenSource.LOCAL, None, ConfigError),
        (TokenSource.ENGINE, "tiny", "engine"),
    ],
)
def test_source_follows_the_policy(
    tmp_path: Path, source: TokenSource, folder: str | None, expected: str | type[Exception]
) -> None:
    """auto: local when the files load and their encoding is tokenizer.json alone, else the
    engine; local: the files or a ConfigError; engine: always the engine."""
    paths = {
        "tiny": str(MODEL_DIR),
        "missing": str(tmp_path / "nope"),
        "inexact": str(_inexact_dir(tmp_path)),
        None: None,
    }
    policy = Policy(tokenizer=paths[folder], token_source=source)
    fake = FakeTokenize(PromptTokenizer.from_dir(MODEL_DIR))
    if isinstance(expected, str):
        assert TokenCounter.for_policy("tiny", policy, fake).source == expected
    else:
        with pytest.raises(expected):
            TokenCounter.for_policy("tiny", policy, fake)


class FakeUpstream:
    """gateway.proxy.Upstream's JSON exchange, answering /tokenize with set replies."""

    def __init__(self, status: int, answer: object) -> None:
        self.status, self.answer = status, answer
        self.calls: list[tuple[str, str, object]] = []

    async def json(
        self, method: str, path: str, payload: object | None = None, *, timeout: float
    ) -> tuple[int, object]:
        self.calls.append((method, path, payload))
        return self.status, self.answer


async def test_counters_are_per_model_and_follow_reloads() -> None:
    """One counter per model, kept while its tokenizer settings stay, remade when they change;
    the engine source goes through the upstream's /tokenize."""
    upstream = FakeUpstream(200, {"count": 9, "max_model_len": MAX_MODEL_LEN})
    counters = TokenCounters(upstream)
    local_policy = Policy(tokenizer=str(MODEL_DIR))
    first = counters.counter("tiny", local_policy)
    assert counters.counter("tiny", local_policy) is first
    assert first.source == "local"
    remote = counters.counter("tiny", Policy(token_source=TokenSource.ENGINE))
    assert remote is not first
    assert await exact_chat(remote, {"messages": USER}) == 9
    assert upstream.calls[0][:2] == ("POST", "/tokenize")
    await counters.close()


@pytest.mark.parametrize(
    ("status", "answer", "error"),
    [
        (400, {"error": {"message": "nope", "param": "messages", "code": 400}}, BadRequest),
        (404, {"detail": "Not Found"}, BadGateway),
        (200, ["not", "an", "object"], BadGateway),
    ],
)
async def test_counters_map_engine_failures(
    status: int, answer: object, error: type[Exception]
) -> None:
    """A /tokenize 400 is the client's; a missing route or a strange answer is a BadGateway."""
    counters = TokenCounters(FakeUpstream(status, answer))
    counter = counters.counter("tiny", Policy(token_source=TokenSource.ENGINE))
    with pytest.raises(error):
        await exact_prompts(counter, {"prompt": "hello"})


async def test_engine_chat_template_setting_is_rendered(tmp_path: Path) -> None:
    """A model whose engine runs with --chat-template (policy chat_template) is counted with
    that template, as a request carrying the same template is, and not with the model's own."""
    template = template_text("vllm_chatml")
    path = tmp_path / "engine-template.jinja"
    path.write_text(template, encoding="utf-8")
    messages = [{"role": "system", "content": "Be brief."}, *USER]
    server_side = TokenCounter.for_policy(
        "tiny",
        Policy(tokenizer=str(MODEL_DIR), token_source=TokenSource.LOCAL, chat_template=str(path)),
        None,
    )
    plain = TokenCounter.for_policy(
        "tiny", Policy(tokenizer=str(MODEL_DIR), token_source=TokenSource.LOCAL), None
    )
    with_server_template = await exact_chat(server_side, {"messages": messages})
    with_request_template = await exact_chat(
        plain, {"messages": messages, "chat_template": template}
    )
    own = await exact_chat(plain, {"messages": messages})
    assert with_server_template == with_request_template
    assert with_server_template != own
