"""Prompt token parity against the real vLLM: the gateway's count, the engine's /tokenize and the
`usage.prompt_tokens` of a real one-token generation are equal for every request of the corpus
(tests/token_corpus.py), under the tiny model's own chat template and under each example chat
template shipped inside the installed vLLM package (vllm/transformers_utils/chat_templates,
the files vLLM falls back to and that operators pass with --chat-template).

The engine of the session runs with --trust-request-chat-template, so a template is applied by
sending its text as the request's `chat_template` (to /tokenize and to the generation alike);
`test_the_engine_applies_a_request_template` checks that it really does.

The gateway's count is `TokenCounter.for_policy(...)` with the tiny model's tokenizer files: the
counter admission uses (`count_*_within(body, None)` is what its exact `count` calls). One probe
in four is also sent through a gateway in front of the same engine.

Exclusions, each needed for the reason given:
- "bad-..." corpus cases: vLLM rejects them, so there is nothing to count. They are still
  probed: the gateway must refuse what the engine refuses (`test_rejections_agree`).
- "unsupported-..." cases (an image part): the local path leaves them to the engine on purpose;
  `test_what_the_local_path_cannot_count_goes_to_the_engine` covers that fallback.
- no generation for a prompt that /tokenize counts at 512 tokens or more (the "long-..." cases
  without truncation, the longest tool histories): vLLM refuses it before it reports usage, so
  it is compared with /tokenize only.
- no generation for a prompt that renders to nothing (template_kimi_audio reads
  `conversations`, which vLLM does not pass; template_basic with an empty message): vLLM
  refuses an empty prompt; /tokenize still counts it (0).
- a template that raises on a request (role alternation, a continued message it drops): the
  engine answers 400 at /tokenize and at generation, and the gateway must refuse it too.

Requests with tools carry `tool_choice: "none"`: the engine runs without a tool parser, which
the default "auto" needs; the tools are rendered into the prompt all the same.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import aiohttp
import pytest

from gateway.config import Policy, TokenSource
from gateway.errors import BadRequest
from gateway.schemas import parse_chat, parse_completion
from gateway.tokens import PromptCount, TokenCounter
from tests.helpers import MODEL_DIR, ROOT, gateway_config, send
from tests.real_engine import MAX_MODEL_LEN, MODEL_NAME, RealEngine
from tests.token_corpus import Case, cases

pytestmark = pytest.mark.engine

CONCURRENCY = 4
"""Requests in flight to the engine at once (it batches them)."""
REQUEST_TIMEOUT_S = 120.0
GATEWAY_EVERY = 4
"""One probe in this many also goes through a gateway."""
MIN_GENERATED = 50
"""The issue's bar: at least this many corpus requests checked against a real generation."""

JsonObj = dict[str, Any]


@cache
def shipped_templates() -> dict[str, str]:
    """The example chat templates inside the engine's vLLM package, by file stem."""
    found = sorted(
        ROOT.glob(
            ".venv-engine/lib/python3*/site-packages/vllm/transformers_utils/chat_templates/*.jinja"
        )
    )
    return {p.stem: p.read_text(encoding="utf-8") for p in found}


def _template_names() -> list[str]:
    return ["model", *shipped_templates()]


# -- the probes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One corpus request under one template, as sent to the engine (max_tokens 1)."""

    id: str
    template: str
    kind: str
    body: JsonObj

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.kind == "chat" else "/v1/completions"


def _request(case: Case, template: str | None) -> JsonObj:
    body: JsonObj = {"model": MODEL_NAME, **case["body"], "max_tokens": 1, "temperature": 0}
    if template is not None:
        body["chat_template"] = template
    if "tools" in body:
        # The engine runs without a tool parser, which the default tool_choice "auto" needs;
        # "none" still hands the tools to the template.
        body["tool_choice"] = "none"
    return body


def probes(template: str) -> list[Probe]:
    """The countable corpus requests under `template` ("model": the model's own template and
    the corpus' own templates; a shipped one: every chat of the corpus that names none)."""
    out = []
    for case in cases():
        if case["id"].startswith(("bad-", "unsupported-")):
            continue
        if template == "model":
            body = _request(case, None)
        elif case["kind"] == "chat" and "chat_template" not in case["body"]:
            body = _request(case, shipped_templates()[template])
        else:
            continue
        out.append(Probe(case["id"], template, case["kind"], body))
    return out


def rejected_probes() -> list[Probe]:
    return [
        Probe(c["id"], "model", c["kind"], _request(c, None))
        for c in cases()
        if c["id"].startswith("bad-")
    ]


# -- the three counts ---------------------------------------------------------------------------


@dataclass
class Counts:
    gateway: list[int] | None = None
    """Per prompt (one for a chat); None when the gateway refused the request."""
    gateway_sources: set[str] = field(default_factory=set)
    tokenize: list[int] | None = None
    usage: int | None = None
    errors: dict[str, str] = field(default_factory=dict)


class Remote:
    """The engine's /tokenize as the gateway's counter reaches it; counts its calls."""

    def __init__(self, session: aiohttp.ClientSession, engine: RealEngine) -> None:
        self.session, self.engine, self.calls = session, engine, 0

    async def __call__(self, payload: dict[str, object]) -> Mapping[str, object]:
        self.calls += 1
        reply = await send(
            self.session,
            self.engine.url + "/tokenize",
            payload,
            REQUEST_TIMEOUT_S,
            content_type=None,
        )
        answer = reply["json"]
        return answer if isinstance(answer, dict) else {}


def counter(
    remote: Callable[[dict[str, object]], Awaitable[Mapping[str, object]]] | None,
) -> TokenCounter:
    policy = Policy(tokenizer=str(MODEL_DIR), token_source=TokenSource.LOCAL)
    made = TokenCounter.for_policy(MODEL_NAME, policy, remote)
    assert made.source == "local"
    return made


async def gateway_count(tokens: TokenCounter, probe: Probe) -> list[PromptCount]:
    """The exact count admission would make (after the same schema check admission does)."""
    if probe.kind == "chat":
        parse_chat(probe.body)
        return [await tokens.count_chat_within(probe.body, None, max_model_len=MAX_MODEL_LEN)]
    parse_completion(probe.body)
    return await tokens.count_completion_within(probe.body, None, max_model_len=MAX_MODEL_LEN)


def _kept(count: int, body: JsonObj) -> int:
    """vLLM's truncation, written out independently of the gateway: k keeps k tokens; -1 keeps
    the window, less one since these requests set an output limit."""
    k = body.get("truncate_prompt_tokens")
    if k is None:
        return count
    return min(count, MAX_MODEL_LEN - 1 if k == -1 else k)


def tokenize_payloads(body: JsonObj) -> list[JsonObj]:
    """The /tokenize requests that count `body`'s prompts. /tokenize has no `documents` or
    `reasoning_effort`; vLLM hands both to the template as kwargs (with `enable_thinking`
    derived from the effort), so they go there."""
    if "prompt" in body:
        prompt = body["prompt"]
        prompts = (
            [prompt]
            if isinstance(prompt, str) or not prompt or not isinstance(prompt[0], str | list)
            else prompt
        )
        return [
            {
                "model": MODEL_NAME,
                "prompt": p,
                "add_special_tokens": body.get("add_special_tokens", True),
            }
            if isinstance(p, str)
            else {"ids": p}
            for p in prompts
        ]
    payload: JsonObj = {"model": MODEL_NAME, "messages": body["messages"]}
    for key in (
        "add_generation_prompt",
        "continue_final_message",
        "add_special_tokens",
        "tools",
        "chat_template",
    ):
        if key in body:
            payload[key] = body[key]
    kwargs = dict(body.get("chat_template_kwargs") or {})
    if "documents" in body:
        kwargs["documents"] = body["documents"]
    if "reasoning_effort" in body:
        kwargs["reasoning_effort"] = body["reasoning_effort"]
        kwargs.setdefault("enable_thinking", body["reasoning_effort"] != "none")
    if kwargs:
        payload["chat_template_kwargs"] = kwargs
    return [payload]


async def engine_tokenize(
    session: aiohttp.ClientSession, engine: RealEngine, body: JsonObj
) -> list[int] | str:
    """Per prompt, /tokenize's count (truncated as vLLM would); or the engine's refusal."""
    out = []
    for payload in tokenize_payloads(body):
        if "ids" in payload:  # token ids count as their length; /tokenize takes text
            out.append(_kept(len(payload["ids"]), body))
            continue
        reply = await send(
            session, engine.url + "/tokenize", payload, REQUEST_TIMEOUT_S, content_type=None
        )
        status, answer = reply["status"], reply["json"]
        if status != 200:
            return f"/tokenize {status}: {answer}"
        assert answer["max_model_len"] == MAX_MODEL_LEN
        assert answer["count"] == len(answer["tokens"])
        out.append(_kept(answer["count"], body))
    return out


def generable(tokenized: list[int] | None) -> bool:
    """Whether a generation can report usage for prompts of these (engine) counts: vLLM refuses
    an empty prompt, and one that fills the window, before it generates."""
    return bool(tokenized) and all(0 < n < MAX_MODEL_LEN for n in tokenized or [])


async def measure(
    session: aiohttp.ClientSession, engine: RealEngine, probe: Probe, tokens: TokenCounter
) -> Counts:
    counts = Counts()
    try:
        made = await gateway_count(tokens, probe)
        counts.gateway = [c.tokens for c in made]
        counts.gateway_sources = {c.source for c in made}
        assert all(c.exact for c in made)
    except BadRequest as err:
        counts.errors["gateway"] = err.message
    tokenized = await engine_tokenize(session, engine, probe.body)
    if isinstance(tokenized, str):
        counts.errors["tokenize"] = tokenized
    else:
        counts.tokenize = tokenized
    if generable(counts.tokenize) or "tokenize" in counts.errors:
        reply = await send(
            session, engine.url + probe.path, probe.body, REQUEST_TIMEOUT_S, content_type=None
        )
        status, answer = reply["status"], reply["json"]
        if status == 200:
            counts.usage = answer["usage"]["prompt_tokens"]
        else:
            counts.errors["generation"] = f"{status}: {str(answer)[:300]}"
    return counts


def mismatch(probe: Probe, counts: Counts) -> str | None:
    """What disagrees for one probe, or None. A request the engine refuses (this template
    raises on it) must be refused by the gateway's counter too: nothing to count then."""
    where = f"{probe.template}/{probe.id}"
    if set(counts.errors) == {"gateway", "tokenize", "generation"}:
        return None
    if counts.errors:
        return f"{where}: {counts.errors} (gateway {counts.gateway}, tokenize {counts.tokenize})"
    if counts.gateway_sources - {"local", "ids"}:
        return f"{where}: counted by {counts.gateway_sources}, not locally"
    if counts.gateway != counts.tokenize:
        return f"{where}: gateway {counts.gateway} != /tokenize {counts.tokenize}"
    if (
        counts.usage is not None
        and counts.gateway is not None
        and counts.usage != sum(counts.gateway)
    ):
        return f"{where}: gateway {counts.gateway} != usage.prompt_tokens {counts.usage}"
    return None


async def run_probes(engine: RealEngine, todo: list[Probe]) -> list[tuple[Probe, Counts]]:
    remote_calls: list[int] = []
    async with aiohttp.ClientSession() as session:
        remote = Remote(session, engine)
        tokens = counter(remote)
        limit = asyncio.Semaphore(CONCURRENCY)

        async def one(probe: Probe) -> tuple[Probe, Counts]:
            async with limit:
                return probe, await measure(session, engine, probe, tokens)

        results = await asyncio.gather(*(one(p) for p in todo))
        remote_calls.append(remote.calls)
    assert remote_calls == [0], "the local counter asked the engine"
    return results


# -- tests --------------------------------------------------------------------------------------


def test_the_templates_are_found() -> None:
    """The example chat templates are read from the installed vLLM package (make test installs
    it), so a vLLM upgrade that adds or changes one is tested as shipped."""
    assert {"template_chatml", "template_basic", "template_blip2"} <= set(shipped_templates())


async def test_the_engine_applies_a_request_template(real_engine: RealEngine) -> None:
    """The session's engine honours a request's chat_template (--trust-request-chat-template),
    for /tokenize and for a generation, so the shipped templates below are really applied."""
    marker = "{% for m in messages %}[[{{ m.content }}]]{% endfor %}"
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    async with aiohttp.ClientSession() as session:
        reply = await send(
            session, real_engine.url + "/tokenize", body, REQUEST_TIMEOUT_S, content_type=None
        )
        own = reply["json"]
        reply = await send(
            session,
            real_engine.url + "/tokenize",
            {**body, "chat_template": marker},
            REQUEST_TIMEOUT_S,
            content_type=None,
        )
        templated = reply["json"]
        reply = await send(
            session,
            real_engine.url + "/tokenize",
            {"model": MODEL_NAME, "prompt": "[[hi]]", "add_special_tokens": False},
            REQUEST_TIMEOUT_S,
            content_type=None,
        )
        text = reply["json"]
        reply = await send(
            session,
            real_engine.url + "/v1/chat/completions",
            {**body, "chat_template": marker},
            REQUEST_TIMEOUT_S,
            content_type=None,
        )
        status, answer = reply["status"], reply["json"]
    assert templated["tokens"] == text["tokens"]
    assert templated["count"] != own["count"]
    assert status == 200
    assert answer["usage"]["prompt_tokens"] == templated["count"]


@pytest.mark.parametrize("template", _template_names())
async def test_counts_agree(real_engine: RealEngine, template: str) -> None:
    """Under this template, for every countable corpus request (at least 50 chats and
    completions reaching a generation under the model's own) the gateway's local count equals
    /tokenize's count and the usage.prompt_tokens of a real one-token generation, and what the
    engine refuses the gateway refuses too."""
    results = await run_probes(real_engine, probes(template))
    failures = [
        problem for probe, counts in results if (problem := mismatch(probe, counts)) is not None
    ]
    assert not failures, "\n".join(failures)
    generated = [probe for probe, counts in results if counts.usage is not None]
    assert generated
    if template == "model":
        assert len(generated) >= MIN_GENERATED
        assert {p.kind for p in generated} == {"chat", "completion"}


async def test_rejections_agree(real_engine: RealEngine) -> None:
    """What vLLM refuses to generate (the corpus' bad requests), the gateway's counter refuses
    too, with a BadRequest, instead of counting it."""
    failures = []
    async with aiohttp.ClientSession() as session:
        tokens = counter(None)
        for probe in rejected_probes():
            reply = await send(
                session,
                real_engine.url + probe.path,
                probe.body,
                REQUEST_TIMEOUT_S,
                content_type=None,
            )
            status = reply["status"]
            try:
                await gateway_count(tokens, probe)
                refused = False
            except BadRequest:
                refused = True
            if status != 400 or not refused:
                failures.append(f"{probe.id}: engine {status}, gateway refused: {refused}")
    assert not failures, "\n".join(failures)


async def test_counts_agree_through_the_gateway(
    gateway_server: Any, real_engine: RealEngine
) -> None:
    """Through a gateway in front of the engine (one probe in four, across all templates): a
    one-token generation is admitted as sent and reports the gateway's count; asking for one
    token more than the window leaves is refused by the gateway naming exactly that count,
    which pins admission's count from both sides."""
    config = gateway_config(
        real_engine.url,
        defaults={"max_tokens_limit": 4096, "on_exceed": "reject"},
        models={
            MODEL_NAME: {
                "tokenizer": str(MODEL_DIR),
                "token_source": "local",
                # as the engine: --trust-request-chat-template
                "trust_request_chat_template": True,
            }
        },
    )
    base = str((await gateway_server(config)).make_url("")).rstrip("/")
    every = [p for t in _template_names() for p in probes(t)]
    failures, sent = [], 0
    async with aiohttp.ClientSession() as session:
        for probe in every[::GATEWAY_EVERY]:
            tokenized = await engine_tokenize(session, real_engine, probe.body)
            if isinstance(tokenized, str) or not generable(tokenized):
                continue  # refused, or nothing a generation could report on (see above)
            sent += 1
            reply = await send(
                session, base + probe.path, probe.body, REQUEST_TIMEOUT_S, content_type=None
            )
            status, answer, header = (
                reply["status"],
                reply["json"],
                reply["headers"].get("X-Vllm-Guard-Max-Tokens"),
            )
            usage = answer.get("usage", {}).get("prompt_tokens") if status == 200 else None
            if usage != sum(tokenized) or header != "kept 1":
                failures.append(
                    f"{probe.template}/{probe.id}: {status} {header} "
                    f"{str(answer)[:300]}, expected {tokenized}"
                )
                continue
            longest = max(tokenized)
            over = {**probe.body, "max_tokens": MAX_MODEL_LEN - longest + 1}
            reply = await send(
                session, base + probe.path, over, REQUEST_TIMEOUT_S, content_type=None
            )
            status, refusal = reply["status"], reply["json"]
            message = refusal.get("error", {}).get("message", "") if status == 400 else ""
            said = re.search(r"your request has (\d+) input tokens", message)
            if said is None or int(said.group(1)) != longest:
                failures.append(
                    f"{probe.template}/{probe.id}: max_tokens "
                    f"{over['max_tokens']} answered {status} {str(refusal)[:300]}, "
                    f"expected a refusal naming {longest} input tokens"
                )
    assert not failures, "\n".join(failures)
    assert sent >= 30


async def _access_count(engine: RealEngine, path: str, expected: int) -> int:
    """The engine's access-log count for `path`, waiting briefly for it to reach `expected`
    (the line is written as the response starts)."""
    deadline = asyncio.get_running_loop().time() + 5.0
    count = engine.access_count(path)
    while count < expected and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
        count = engine.access_count(path)
    return count


async def test_what_the_local_path_cannot_count_goes_to_the_engine(
    gateway_server: Any, real_engine: RealEngine
) -> None:
    """Requests the local path cannot reproduce (a chat_template_kwargs key that changes how
    the template is called, an image part) are counted by the engine's /tokenize, even with
    local tokenizer files: the count's source says so, the engine's access log shows the
    /tokenize call, and the gateway answers what the engine answers."""
    kwargs_body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "Hello"}],
        "chat_template_kwargs": {"tokenize": False},
        "max_tokens": 1,
    }
    image_body = _request(next(c for c in cases() if c["id"] == "unsupported-image"), None)
    async with aiohttp.ClientSession() as session:
        remote = Remote(session, real_engine)
        made = await counter(remote).count_chat_within(
            kwargs_body, None, max_model_len=MAX_MODEL_LEN
        )
        assert made.source == "engine"
        assert remote.calls == 1
        reply = await send(
            session,
            real_engine.url + "/tokenize",
            kwargs_body,
            REQUEST_TIMEOUT_S,
            content_type=None,
        )
        direct = reply["json"]
        assert made.tokens == direct["count"]

        config = gateway_config(
            real_engine.url,
            models={MODEL_NAME: {"tokenizer": str(MODEL_DIR), "token_source": "local"}},
        )
        base = str((await gateway_server(config)).make_url("")).rstrip("/")
        before = real_engine.access_count("/tokenize")
        reply = await send(
            session,
            base + "/v1/chat/completions",
            kwargs_body,
            REQUEST_TIMEOUT_S,
            content_type=None,
        )
        status, answer = reply["status"], reply["json"]
        assert status == 200, answer
        assert answer["usage"]["prompt_tokens"] == direct["count"]
        assert await _access_count(real_engine, "/tokenize", before + 1) == before + 1

        # The tiny model is text-only: the engine refuses the image, at /tokenize as at
        # generation, and the gateway passes that refusal on.
        reply = await send(
            session,
            real_engine.url + "/v1/chat/completions",
            image_body,
            REQUEST_TIMEOUT_S,
            content_type=None,
        )
        engine_status, engine_answer = reply["status"], reply["json"]
        reply = await send(
            session, base + "/v1/chat/completions", image_body, REQUEST_TIMEOUT_S, content_type=None
        )
        status, answer = reply["status"], reply["json"]
        assert await _access_count(real_engine, "/tokenize", before + 2) == before + 2
    assert engine_status == status == 400
    assert answer["error"]["message"] == engine_answer["error"]["message"]
    assert answer["error"]["type"] == "BadRequestError"
