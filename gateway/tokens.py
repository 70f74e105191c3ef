"""Prompt token counts for admission, exactly as vLLM will count them.

One `TokenCounter` per model. Its source is the model's own tokenizer files read locally
(`engine.tokenization.PromptTokenizer`: tokenizer.json with the `tokenizers` library and the chat
template rendered with Jinja2 as transformers renders it) or the engine's `POST /tokenize`, which
answers with vLLM's own count. `token_source: auto` takes the local files when they are readable
and their tokenizer class is one whose encoding is tokenizer.json alone, else the engine. A
request the local path cannot reproduce (images, unusual message shapes, template kwargs that
change how the template is called) is counted by the engine whatever the source.

Cheap bounds first. Admission calls `count_chat_within` / `count_completion_within` with the
policy's threshold (`policy.exact_count_above`): they answer with a cheap upper bound when it is
at most the threshold, and with the exact count past it; a threshold of None always counts
exactly. That is the whole counting API. A chat's cheapest bound needs no rendering at all: for a
template whose output length `engine.render_bound` can bound from the messages' byte lengths
(proven once per template), that bound; else the chat is rendered once and bounded by the
rendered text (`PromptTokenizer.upper_bound`: its UTF-8 length plus the special tokens, for a
byte-level BPE).

Truncation is reflected: with `truncate_prompt_tokens: k` vLLM keeps k tokens (the last k, BOS
kept), so the count is min(count, k); k = -1 means the model's `max_model_len`, less one when the
request sets an output limit (`TokenizeParams.max_truncation_tokens`).

Counting never blocks the event loop for long: a request with more than `inline_chars`
characters of text, or with a chat template of its own, is counted in one of the counters'
worker threads (`server.count_threads`, like vLLM's `--renderer-num-workers`), a short one
inline. The threads are few on purpose: counting is CPU work, so more of them than the
gateway's cores add no throughput, and each holds the memory of the prompt it encodes (about
10 MB for 30,000 tokens) until glibc reuses it; a burst of long prompts queues for them.

This module does not import aiohttp.web. Client mistakes become `errors.BadRequest` naming the
parameter; an engine that cannot be asked raises what its `json` exchange raises.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from engine.chat_prepare import PreparedChat, plain_request
from engine.tokenization import (
    InvalidChat,
    PromptTokenizer,
    UnsupportedLocally,
    completion_prompts,
)
from gateway.config import ConfigError, Policy, TokenSource
from gateway.errors import BadGateway, BadRequest

Remote = Callable[[dict[str, object]], Awaitable[Mapping[str, object]]]
"""POST a payload to the engine's /tokenize; the engine's JSON answer (a count or an error)."""

INLINE_CHARS = 16_384
"""Requests with more text than this are counted in a worker thread."""

TOKENIZE_TIMEOUT_S = 30.0

_RENDERED_FIELDS = ("messages", "tools", "documents", "chat_template_kwargs")
"""Chat fields whose text the template may render into the prompt."""

# pydantic's lax booleans, which vLLM's request models accept.
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})
_COMPLETION_DEFAULT_MAX_TOKENS = 16  # CompletionRequest.max_tokens


@dataclass(slots=True)
class PromptCount:
    tokens: int
    """The exact count, or when `exact` is false a bound of it: an upper bound below every
    threshold, or a lower bound past the refusal one."""
    exact: bool
    source: Literal["local", "engine", "ids"]


@dataclass(slots=True)
class _Chat:
    """The fields of a chat request that decide its prompt, read and checked like vLLM does."""

    messages: object
    tools: object
    chat_template: str | None
    chat_template_kwargs: dict[str, object] | None
    documents: object
    reasoning_effort: str | None
    add_generation_prompt: bool
    continue_final_message: bool
    add_special_tokens: bool
    truncate: int | None
    max_output: int

    @classmethod
    def read(cls, body: Mapping[str, object]) -> _Chat:
        template = body.get("chat_template")
        if template is not None and not isinstance(template, str):
            raise BadRequest("chat_template must be a string.", param="chat_template")
        kwargs = body.get("chat_template_kwargs")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise BadRequest(
                "chat_template_kwargs must be an object.", param="chat_template_kwargs"
            )
        effort = body.get("reasoning_effort")
        if effort is not None and not isinstance(effort, str):
            raise BadRequest("reasoning_effort must be a string.", param="reasoning_effort")
        max_output = _int_field(body, "max_completion_tokens")
        if max_output is None:
            max_output = _int_field(body, "max_tokens")
        return cls(
            messages=body.get("messages"),
            tools=body.get("tools"),
            chat_template=template,
            chat_template_kwargs=kwargs,
            documents=body.get("documents"),
            reasoning_effort=effort,
            add_generation_prompt=_flag(body, "add_generation_prompt", True),
            continue_final_message=_flag(body, "continue_final_message", False),
            add_special_tokens=_flag(body, "add_special_tokens", False),
            truncate=_truncate_field(body),
            max_output=max_output or 0,
        )

    @property
    def plain(self) -> bool:
        """No tools, documents, template, template arguments or reasoning effort of its own,
        and the final message not continued (`PromptTokenizer.plain_chat_bound` may apply)."""
        return not self.continue_final_message and plain_request(
            self.tools,
            self.documents,
            self.chat_template,
            self.chat_template_kwargs,
            self.reasoning_effort,
        )

    def prepare(self, tok: PromptTokenizer) -> PreparedChat:
        return tok.prepare_chat(
            self.messages,
            add_generation_prompt=self.add_generation_prompt,
            continue_final_message=self.continue_final_message,
            tools=self.tools,
            chat_template=self.chat_template,
            chat_template_kwargs=self.chat_template_kwargs,
            documents=self.documents,
            reasoning_effort=self.reasoning_effort,
        )

    def tokenize_payload(self, model: str) -> dict[str, object]:
        """The /tokenize request that counts this chat. /tokenize has no `documents` or
        `reasoning_effort`; vLLM passes them to the template as kwargs, so they go there."""
        payload: dict[str, object] = {
            "model": model,
            "messages": self.messages,
            "add_generation_prompt": self.add_generation_prompt,
            "continue_final_message": self.continue_final_message,
            "add_special_tokens": self.add_special_tokens,
        }
        if self.tools is not None:
            payload["tools"] = self.tools
        if self.chat_template is not None:
            payload["chat_template"] = self.chat_template
        kwargs = dict(self.chat_template_kwargs or {})
        if self.documents is not None:
            kwargs["documents"] = self.documents
        if self.reasoning_effort is not None:
            kwargs["reasoning_effort"] = self.reasoning_effort
            kwargs.setdefault("enable_thinking", self.reasoning_effort != "none")
        if kwargs:
            payload["chat_template_kwargs"] = kwargs
        return payload


def _flag(body: Mapping[str, object], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if isinstance(value, bool):
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise BadRequest(f"{name} must be a boolean.", param=name)


def _int_field(body: Mapping[str, object], name: str) -> int | None:
    value = body.get(name)
    if type(value) is int:
        return value
    if type(value) is float and value.is_integer():
        return int(value)
    return None


def _truncate_field(body: Mapping[str, object]) -> int | None:
    value = body.get("truncate_prompt_tokens")
    if value is None:
        return None
    number = _int_field(body, "truncate_prompt_tokens")
    if number is None or number < -1:
        raise BadRequest(
            "truncate_prompt_tokens must be an integer of at least -1 (-1: the "
            "model's context length).",
            param="truncate_prompt_tokens",
        )
    return number


def _truncation(k: int | None, max_output: int, max_model_len: int | None) -> int | None:
    """How many tokens vLLM keeps (`TokenizeParams._truncation_slice`), None for all."""
    if k is None:
        return None
    if max_model_len is not None and k > max_model_len:
        raise BadRequest(
            f"truncate_prompt_tokens={k} cannot be greater than max_model_len = "
            f"{max_model_len}. Please request a smaller truncation size.",
            param="truncate_prompt_tokens",
        )
    if k >= 0:
        return k
    if max_model_len is None:
        return None  # unknown window: the untruncated count over-estimates, never under
    return max(0, max_model_len - 1) if max_output else max_model_len


def _truncated(count: PromptCount, keep: int | None) -> PromptCount:
    if keep is None or count.tokens <= keep:
        return count
    return PromptCount(keep, count.exact, count.source)


def _text_size(value: object, limit: int) -> int:
    """Characters of text in a JSON value, counted until `limit` is passed."""
    total, stack = 0, [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
            total += len(item)
        elif isinstance(item, list):
            stack.extend(item)
    return total


def _read_completion(
    body: Mapping[str, object], max_model_len: int | None
) -> tuple[Sequence[str | list[int]], bool, int | None]:
    """A completions request's prompts, add_special_tokens, and how many tokens vLLM keeps."""
    max_output = _int_field(body, "max_tokens")
    if body.get("max_tokens") is None:  # CompletionRequest.normalize_null_max_tokens
        max_output = _COMPLETION_DEFAULT_MAX_TOKENS
    keep = _truncation(_truncate_field(body), max_output or 0, max_model_len)
    add_special_tokens = _flag(body, "add_special_tokens", True)
    try:
        prompts = completion_prompts(body.get("prompt"))
    except InvalidChat as err:
        raise _bad_request(err) from None
    return prompts, add_special_tokens, keep


def _bad_request(err: InvalidChat) -> BadRequest:
    return BadRequest(err.message, param=err.param or "messages")


class TokenCounter:
    """Counts the prompt tokens of one model's requests."""

    def __init__(
        self,
        model: str,
        *,
        tokenizer: PromptTokenizer | None,
        remote: Remote | None,
        inline_chars: int = INLINE_CHARS,
        executor: Executor | None = None,
    ) -> None:
        """`executor` runs the counts too long to make inline; None: asyncio's default."""
        if tokenizer is None and remote is None:
            raise ValueError("a token counter needs a local tokenizer or the engine")
        self.model = model
        self.tokenizer = tokenizer
        self._remote = remote
        self._inline_chars = inline_chars
        self._executor = executor

    @property
    def source(self) -> Literal["local", "engine"]:
        return "local" if self.tokenizer is not None else "engine"

    @classmethod
    def for_policy(
        cls,
        model: str,
        policy: Policy,
        remote: Remote | None,
        executor: Executor | None = None,
    ) -> TokenCounter:
        """The counter a policy asks for. Raises ConfigError when `token_source: local` names
        tokenizer files that cannot be read."""
        tokenizer = None
        if policy.token_source is not TokenSource.ENGINE and policy.tokenizer is not None:
            try:
                template = (
                    None
                    if policy.chat_template is None
                    else Path(policy.chat_template).read_text(encoding="utf-8")
                )
                tokenizer = PromptTokenizer.from_dir(
                    Path(policy.tokenizer),
                    chat_template=template,
                    chat_template_kwargs=policy.default_chat_template_kwargs,
                )
            except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception
                if policy.token_source is TokenSource.LOCAL:
                    raise ConfigError(
                        f"models.{model}.tokenizer: cannot load the tokenizer in "
                        f"{policy.tokenizer}: {err}"
                    ) from None
            if (
                tokenizer is not None
                and not tokenizer.exact
                and policy.token_source is TokenSource.AUTO
            ):
                tokenizer = None  # counted by the engine: the local encoding may differ
        elif policy.token_source is TokenSource.LOCAL:
            raise ConfigError(f"models.{model}: token_source local needs a tokenizer folder")
        return cls(model, tokenizer=tokenizer, remote=remote, executor=executor)

    # -- counting ------------------------------------------------------------------------------

    async def count_chat_within(
        self,
        body: Mapping[str, object],
        limit: int | None,
        *,
        max_model_len: int | None = None,
        refuse_at: int | None = None,
    ) -> PromptCount:
        """The upper bound when it is at most `limit` (no decision can then depend on the
        exact count), else the exact count. `limit=None` always counts exactly. A prompt whose
        cheap lower bound is at least `refuse_at` (it is refused whatever its exact count) is
        answered with that lower bound, not tokenized."""
        chat = _Chat.read(body)
        keep = _truncation(chat.truncate, chat.max_output, max_model_len)
        local = await self._chat_local(chat, body, keep, _Limits(limit, refuse_at))
        if isinstance(local, PromptCount):
            return local
        tokens = await self._ask_engine(chat.tokenize_payload(self.model), local)
        return _truncated(PromptCount(tokens, True, "engine"), keep)

    async def count_completion_within(
        self,
        body: Mapping[str, object],
        limit: int | None,
        *,
        max_model_len: int | None = None,
        refuse_at: int | None = None,
    ) -> list[PromptCount]:
        """Per prompt of a completions request: its bound when at most `limit`, else exact;
        when a prompt's lower bound is at least `refuse_at`, every prompt's lower bound (the
        request is refused, nothing is tokenized)."""
        prompts, add_special_tokens, keep = _read_completion(body, max_model_len)
        local = await self._prompts_local(
            prompts, add_special_tokens, keep, _Limits(limit, refuse_at)
        )
        if local is not None:
            return local
        counts = await asyncio.gather(
            *(self._engine_prompt(p, add_special_tokens) for p in prompts)
        )
        return [_truncated(c, keep) for c in counts]

    # -- internals -----------------------------------------------------------------------------
    # `limit`: None counts exactly; a number returns the bound when the (truncated) bound is at
    # most that.

    async def _chat_local(
        self, chat: _Chat, body: Mapping[str, object], keep: int | None, limit: _Limits
    ) -> PromptCount | str:
        """The count made here, or why the engine must make it."""
        tok = self.tokenizer
        if tok is None:
            return "the engine counts this model"
        if limit.exact_above is not None and chat.plain:
            # A plain chat's bound is a few lengths of its messages, made here whatever the
            # prompt's size (like the body's parse): most requests end with it, without the
            # size's walk or a worker thread.
            nbytes = tok.plain_chat_bound(chat.messages, chat.add_generation_prompt)
            bound = None if nbytes is None else tok.tokens_bound(nbytes)
            if bound is not None and _within(bound, keep, limit.exact_above):
                return _truncated(PromptCount(bound, False, "local"), keep)
        size = sum(
            _text_size(value, self._inline_chars)
            for key in _RENDERED_FIELDS
            if (value := body.get(key)) is not None
        )
        own = tok.chat_template
        if chat.chat_template is not None and not (
            isinstance(own, dict) and chat.chat_template in own
        ):
            # The client's own template: its loops can make a short request slow to render.
            size = self._inline_chars + 1
        try:
            count: PromptCount = await self._off_loop(size, _local_chat, tok, chat, keep, limit)
        except InvalidChat as err:
            raise _bad_request(err) from None
        except UnsupportedLocally as err:
            return str(err)
        return _truncated(count, keep)

    async def _prompts_local(
        self,
        prompts: Sequence[str | list[int]],
        add_special_tokens: bool,
        keep: int | None,
        limit: _Limits,
    ) -> list[PromptCount] | None:
        """The counts made here; None when a text prompt needs the engine."""
        if self.tokenizer is not None:
            size = sum(len(p) for p in prompts if isinstance(p, str))
            counts: list[PromptCount] = await self._off_loop(
                size, _local_prompts, self.tokenizer, prompts, add_special_tokens, keep, limit
            )
        elif any(isinstance(p, str) for p in prompts):
            return None
        else:
            counts = [PromptCount(len(p), True, "ids") for p in prompts]
        return [_truncated(c, keep) for c in counts]

    async def _off_loop(self, size: int, fn: Callable[..., Any], *args: Any) -> Any:
        if size > self._inline_chars:
            # As asyncio.to_thread does, with the context; a count still queued when its
            # request is cancelled is dropped with it.
            work = functools.partial(contextvars.copy_context().run, fn, *args)
            return await asyncio.get_running_loop().run_in_executor(self._executor, work)
        return fn(*args)

    async def _engine_prompt(
        self, prompt: str | list[int], add_special_tokens: bool
    ) -> PromptCount:
        if isinstance(prompt, list):
            return PromptCount(len(prompt), True, "ids")
        tokens = await self._ask_engine(
            {"model": self.model, "prompt": prompt, "add_special_tokens": add_special_tokens},
            "the engine counts this model",
        )
        return PromptCount(tokens, True, "engine")

    async def _ask_engine(self, payload: dict[str, object], reason: str) -> int:
        if self._remote is None:
            raise BadRequest(
                f"This request's prompt cannot be counted by the gateway "
                f"({reason}) and no engine tokenizer is configured.",
                param="messages" if "messages" in payload else "prompt",
            )
        answer = await self._remote(payload)
        count = answer.get("count")
        if type(count) is int:
            return count
        error = answer.get("error")
        detail: Mapping[str, object] = error if isinstance(error, Mapping) else answer
        message = detail.get("message")
        code = detail.get("code")
        param = detail.get("param")
        if isinstance(message, str) and code in (None, 400, "400"):
            raise BadRequest(message, param=param if isinstance(param, str) else None)
        raise BadGateway(f"The engine's /tokenize gave no count ({message or 'no message'}).")


@dataclass(slots=True)
class _Limits:
    """Where a count stops mattering: an upper bound at most `exact_above` settles the
    decision; so does a lower bound at least `refuse_at` (the prompt is refused)."""

    exact_above: int | None
    refuse_at: int | None


def _within(bound: int, keep: int | None, limit: int | None) -> bool:
    return limit is not None and min(bound, keep if keep is not None else bound) <= limit


def _refused_by_lower_bound(
    tok: PromptTokenizer, text: str, keep: int | None, refuse_at: int | None
) -> int | None:
    """The prompt's lower bound when it alone refuses the prompt (truncation considered)."""
    if refuse_at is None or (keep is not None and keep < refuse_at):
        return None
    low = tok.lower_bound(text)
    return low if low is not None and low >= refuse_at else None


def _local_chat(tok: PromptTokenizer, chat: _Chat, keep: int | None, limit: _Limits) -> PromptCount:
    """A bound without rendering when the template's length bound (engine.render_bound)
    settles the decision; else render once: the lower bound when it alone refuses, the upper
    bound of the text when it settles it, else encode. The request's checks run either way
    (`prepare_chat`; a plain chat's bound, `plain_chat_bound`, made before on the loop, is made
    without them, its checks being certain to pass)."""
    prepared = chat.prepare(tok)
    if limit.exact_above is not None:
        nbytes = prepared.length_bound()
        bound = None if nbytes is None else tok.tokens_bound(nbytes)
        if bound is not None and _within(bound, keep, limit.exact_above):
            return PromptCount(bound, False, "local")
    text = prepared.render()
    low = _refused_by_lower_bound(tok, text, keep, limit.refuse_at)
    if low is not None:
        return PromptCount(low, False, "local")
    if limit.exact_above is not None:
        bound = tok.upper_bound(text)
        if _within(bound, keep, limit.exact_above):
            return PromptCount(bound, False, "local")
    return PromptCount(len(tok.encode_completion(text, chat.add_special_tokens)), True, "local")


def _local_prompts(
    tok: PromptTokenizer,
    prompts: Sequence[str | list[int]],
    add_special_tokens: bool,
    keep: int | None,
    limit: _Limits,
) -> list[PromptCount]:
    lows = [
        _refused_by_lower_bound(tok, p, keep, limit.refuse_at) if isinstance(p, str) else None
        for p in prompts
    ]
    if any(low is not None for low in lows):  # refused: no prompt needs tokenizing
        return [
            PromptCount(len(p), True, "ids")
            if isinstance(p, list)
            else PromptCount(tok.lower_bound(p) or 0, False, "local")
            for p in prompts
        ]
    out = []
    for prompt in prompts:
        if isinstance(prompt, list):
            out.append(PromptCount(len(prompt), True, "ids"))
            continue
        if limit.exact_above is not None:
            bound = tok.upper_bound(prompt)
            if _within(bound, keep, limit.exact_above):
                out.append(PromptCount(bound, False, "local"))
                continue
        tokens = len(tok.encode_completion(prompt, add_special_tokens))
        out.append(PromptCount(tokens, True, "local"))
    return out


class JsonExchange(Protocol):
    """What the counters need of `gateway.proxy.Upstream`."""

    async def json(
        self, method: str, path: str, payload: object | None = None, *, timeout: float
    ) -> tuple[int, object]: ...


def _counter_key(policy: Policy) -> tuple[object, ...]:
    """What a counter is made from: a policy change outside these keeps the counter."""
    return (
        policy.tokenizer,
        policy.token_source,
        policy.chat_template,
        policy.default_chat_template_kwargs,
    )


class TokenCounters:
    """The counters of all models: made ahead for each validated snapshot (`prepare`, then
    `adopt` at the swap), or on first use for a model the snapshot did not name."""

    def __init__(
        self,
        upstream: JsonExchange | None,
        timeout_s: float = TOKENIZE_TIMEOUT_S,
        *,
        threads: int = 1,
    ) -> None:
        """`threads`: the worker threads of all counters (`server.count_threads`)."""
        self._upstream = upstream
        self._timeout_s = timeout_s
        self._counters: dict[str, tuple[tuple[object, ...], TokenCounter]] = {}
        # Threads start on first use: a config check that makes counters starts none.
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="vllm-guard-count")

    def counter(self, model: str, policy: Policy) -> TokenCounter:
        key = _counter_key(policy)
        known = self._counters.get(model)
        if known is not None and known[0] == key:
            return known[1]
        counter = TokenCounter.for_policy(model, policy, self._remote, self._executor)
        if known is None:
            self._counters[model] = (key, counter)
        # Else the caller's policy is older than the installed one (a request that began
        # before a reload): its counter serves it alone and does not replace the new one.
        return counter

    def prepare(self, model: str, policy: Policy) -> TokenCounter:
        """The counter `policy` asks for, made but not installed: it loads tokenizer files, so
        a reload calls it in a worker thread while it validates a snapshot. Raises ConfigError
        as `TokenCounter.for_policy` does."""
        return TokenCounter.for_policy(model, policy, self._remote, self._executor)

    def adopt(self, prepared: Mapping[str, tuple[Policy, TokenCounter]]) -> None:
        """Install the counters prepared for a new snapshot in place of all others (a removed
        model's counter goes with it)."""
        self._counters = {m: (_counter_key(p), c) for m, (p, c) in prepared.items()}

    async def _remote(self, payload: dict[str, object]) -> Mapping[str, object]:
        if self._upstream is None:
            raise BadGateway("No engine to count the prompt with.")
        status, answer = await self._upstream.json(
            "POST", "/tokenize", payload, timeout=self._timeout_s
        )
        if not isinstance(answer, Mapping):
            raise BadGateway(f"The engine's /tokenize answered {status} with no JSON object.")
        if status >= 400 and "error" not in answer and "message" not in answer:
            return {"error": {"message": f"/tokenize answered {status}", "code": status}}
        return answer

    async def close(self) -> None:
        self._counters.clear()
        # A count running now finishes in its thread; none waits for it.
        self._executor.shutdown(wait=False, cancel_futures=True)
