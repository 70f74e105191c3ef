"""The generation paths: admission, then attempts at the engine until one answers.

body → view (schema) → quarantine? → engine ready (held while it restarts) → model known?
→ prompt tokens (cheap bound first) → policy decision → gate (probation, bulkhead)
→ relay; on an engine failure before the client saw a byte: settle, blame, retry.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from typing import Any, NoReturn

from aiohttp import web

from gateway.config import Policy
from gateway.errors import (
    BadRequest,
    EngineFailed,
    EngineUnavailable,
    GuardError,
    NotFound,
    StreamCut,
)
from gateway.handlers import canonical_path, read_json_object
from gateway.inflight import Inflight
from gateway.isolation import fingerprint
from gateway.keys import CONFIG, GATE, LIFECYCLE, RECORD, SUPERVISOR, TOKENS, UPSTREAM
from gateway.policy import Admit, Reject, context_length_for, decide, exact_count_above, precheck
from gateway.proxy import (
    continue_stream,
    end_stream_with_error,
    engine_answer,
    forward_headers,
    relay_response,
)
from gateway.resume import (
    EventRewriter,
    StreamLog,
    continuation,
    partial_answer,
    resumable,
)
from gateway.schemas import ChatView, CompletionView, parse_chat, parse_completion
from gateway.tokens import TokenCounter


async def generation(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions and /v1/completions (also under /openai)."""
    app = request.app
    record = request[RECORD]
    config = app[CONFIG].current
    path = canonical_path(request.path)
    _, body = await read_json_object(request)
    view: ChatView | CompletionView = (
        parse_chat(body) if path.endswith("/chat/completions") else parse_completion(body)
    )
    record.model = view.model[:MODEL_NAME_LOGGED] if view.model else view.model
    if app[LIFECYCLE].draining:
        raise EngineUnavailable("The gateway is shutting down.", retry_after_s=5)

    gate = app[GATE]
    fp = fingerprint(body, config.isolation.fingerprint_skip)
    record.fields["fingerprint"] = fp
    gate.check_quarantine(fp)

    policy = config.policy_for(view.model)
    deadline = time.monotonic() + policy.deadline_s
    refusal = precheck(view, policy)
    if refusal is not None:
        _reject(record.fields, refusal)

    supervisor = app[SUPERVISOR]
    await gate.wait_engine(deadline)
    model = _served_model(view.model, supervisor.models)
    record.model = model
    if view.model != model:
        policy = config.policy_for(model)
    context_length = context_length_for(policy, supervisor.models.get(model))
    if context_length is None:  # the engine did not say; only the policy could
        raise EngineUnavailable(
            "The engine's context length is not known yet.",
            retry_after_s=supervisor.retry_after_s(),
        )

    if not policy.trust_request_chat_template and _brings_a_template(body):
        raise BadRequest(UNTRUSTED_TEMPLATE)
    counter = app[TOKENS].counter(model, policy)
    prompt_tokens = await _prompt_tokens(
        counter, view, body, policy, context_length, supervisor.models.get(model)
    )
    decision = decide(view, policy, prompt_tokens, context_length)
    if isinstance(decision, Reject):
        _reject(record.fields, decision)
    record.fields.update(decision.log_fields)
    record.fields["prompt_tokens"] = max(prompt_tokens)
    return await _attempts(
        request, path, decision.rewrite(body), decision, model, fp, policy, deadline
    )


UNTRUSTED_TEMPLATE = (
    "Chat template is passed with request, but --trust-request-chat-template is not set. "
    "Refused request with untrusted chat template."
)
"""vLLM's own refusal (vllm/renderers/online_renderer.py), given before the engine sees it."""


def _brings_a_template(body: Mapping[str, Any]) -> bool:
    kwargs = body.get("chat_template_kwargs")
    return body.get("chat_template") is not None or (
        isinstance(kwargs, Mapping) and kwargs.get("chat_template") is not None
    )


def _reject(fields: dict[str, Any], refusal: Reject) -> NoReturn:
    fields.update(refusal.log_fields)
    raise refusal.error


MODEL_NAME_LOGGED = 256
"""A client's model name is cut to this in logs and messages (it is client input)."""


def _served_model(requested: str | None, served: Mapping[str, int]) -> str:
    """vLLM's rule: no model means the first served one; an unknown one is a 404."""
    if requested is None or requested == "":
        return next(iter(served))
    if requested not in served:
        aliases = ", ".join(served)
        name = (
            requested
            if len(requested) <= MODEL_NAME_LOGGED
            else requested[:MODEL_NAME_LOGGED] + "..."
        )
        raise NotFound(
            f"The model `{name}` does not exist. Valid aliases: {aliases}.", param="model"
        )
    return requested


async def _prompt_tokens(
    counter: TokenCounter,
    view: ChatView | CompletionView,
    body: dict[str, Any],
    policy: Policy,
    context_length: int,
    max_model_len: int | None,
) -> list[int]:
    """Per prompt, a count that decides as the exact one would: the cheap upper bound when
    it is below every threshold of the policy, else the exact count (one render either way)."""
    limit = exact_count_above(view, policy, context_length)
    if isinstance(view, ChatView):
        count = await counter.count_chat_within(body, limit, max_model_len=max_model_len)
        return [count.tokens]
    counts = await counter.count_completion_within(body, limit, max_model_len=max_model_len)
    return [c.tokens for c in counts]


async def _attempts(
    request: web.Request,
    path: str,
    body: dict[str, Any],
    decision: Admit,
    model: str,
    fp: str,
    policy: Policy,
    deadline: float,
) -> web.StreamResponse:
    """Send the admitted request until an attempt answers. An engine failure before the
    client saw a byte is retried (as a suspect: probation decides); a stream cut after that
    is resumed where it stopped (gateway.resume), or ended with vLLM's error event."""
    app = request.app
    record = request[RECORD]
    gate = app[GATE]
    chat = path.endswith("/chat/completions")
    headers = forward_headers(request.headers, record.request_id)
    headers["Content-Type"] = "application/json"
    extra = {**decision.headers, "X-Request-Id": record.request_id}
    payload = json.dumps(body, ensure_ascii=False).encode()
    log = StreamLog() if resumable(body, chat) else None
    stream: web.StreamResponse | None = None  # the client's, once a cut stream is resumed
    rewriter: EventRewriter | None = None
    attempt = 0
    while True:
        attempt += 1
        try:
            ticket = await gate.enter(record.request_id, model, fp, policy.max_in_flight, deadline)
        except GuardError as err:
            if stream is None:
                raise
            await end_stream_with_error(stream, err.message)
            return stream
        answered = False

        def on_progress(chunk: bytes, ticket: Inflight = ticket) -> None:
            record.mark_first_byte()
            gate.ledger.progress(ticket, len(chunk))
            if log is not None:
                log.append(chunk)

        try:
            if stream is not None:  # resume: ask for the rest of what the client has
                partial = partial_answer(log, chat) if log is not None else None
                assert partial is not None  # checked when the stream was cut
                rest = continuation(body, partial, chat)
                if rest is None:  # nothing left to generate: just end the stream
                    await stream.write(b"data: [DONE]\n\n")
                    await stream.write_eof()
                    answered = True
                    return stream
                payload = json.dumps(rest, ensure_ascii=False).encode()
                rewriter = EventRewriter(partial, chat)
            limit = gate.solo_limit() if ticket.solo else None
            async with asyncio.timeout(limit):
                upstream = await app[UPSTREAM].open("POST", path, payload, headers)
                if stream is None:
                    resp = await relay_response(request, upstream, extra, on_progress)
                else:
                    assert rewriter is not None
                    await continue_stream(stream, upstream, rewriter.feed, on_progress)
                    resp = stream
            answered = True
            record.fields["attempts"] = attempt
            return resp
        except EngineFailed as err:
            if not await gate.settle(ticket):
                # The engine is fine: this was about this request alone. Relay the engine's
                # own answer when it gave one.
                if stream is not None:
                    await end_stream_with_error(stream, err.message)
                    return stream
                answered = True  # by the engine, which stayed fine: not a culprit
                return engine_answer(err, app[SUPERVISOR].retry_after_s())
            # The engine failed with this request in flight and the client has seen nothing
            # (more): it is now a suspect; the next round waits for the engine and probation.
            record.fields["engine_failures"] = record.fields.get("engine_failures", 0) + 1
        except StreamCut as cut:
            stream = cut.response
            record.fields["engine_failures"] = record.fields.get("engine_failures", 0) + 1
            failed = await gate.settle(ticket)
            if not failed or log is None or partial_answer(log, chat) is None:
                record.outcome = "stream_cut"
                await end_stream_with_error(
                    stream, "The engine failed during the stream; the answer is incomplete."
                )
                return stream
            record.fields["resumed"] = record.fields.get("resumed", 0) + 1
        except TimeoutError:
            message = (
                "The request is a suspect of an engine failure and did not finish alone "
                "on probation in time."
            )
            if stream is not None:
                await end_stream_with_error(stream, message)
                return stream
            raise EngineUnavailable(
                message, retry_after_s=app[SUPERVISOR].retry_after_s()
            ) from None
        finally:
            gate.leave(ticket, answered=answered)
