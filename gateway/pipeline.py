"""The generation pipeline: admission in named steps, then the engine until it answers.

`generate` reads like the README's "How a request goes":

    read the body → its view (schema) → not draining → quarantined? → policy prechecks
    → engine ready (held while it restarts) → served model and its context length
    → chat template trusted? → request limits (gateway.hardening) → prompt tokens (cheap
    bound first) → policy decision → output budget
    → the exchange with the engine (`gateway.exchange`: gate, relay, retry, resume)

Each step either passes what the next one needs or raises the `GuardError` the middleware
renders. The two endpoints (chat, completions) differ only in their `Endpoint`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from aiohttp import web

from engine.supervisor import EngineSupervisor
from gateway.admission import ClientShare
from gateway.aliases import policy_name
from gateway.body import read_json_object
from gateway.config import Config, Policy
from gateway.edge import client_key
from gateway.errors import BadRequest, Cause, EngineUnavailable, NotFound
from gateway.exchange import Exchange, answer
from gateway.hardening import limit_output, limit_request
from gateway.isolation import fingerprint
from gateway.keys import CONFIG, GATE, LIFECYCLE, RECORD, SUPERVISOR, TOKENS, VOCABULARIES
from gateway.metrics import action_label
from gateway.policy import (
    Admit,
    Reject,
    context_length_for,
    decide,
    exact_count_above,
    precheck,
    refused_from,
)
from gateway.requestlog import RequestRecord
from gateway.schemas import ChatView, CompletionView, parse_chat, parse_completion

View = ChatView | CompletionView


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One generation endpoint: the path the engine knows it under and how its body reads."""

    path: str
    chat: bool
    parse: Callable[[dict[str, Any]], View]
    name: str
    """Its `endpoint` metric label."""


CHAT = Endpoint("/v1/chat/completions", True, parse_chat, "chat")
COMPLETIONS = Endpoint("/v1/completions", False, parse_completion, "completions")


@dataclass(slots=True)
class Target:
    """The served model a request goes to, its policy and its context length."""

    model: str
    policy: Policy
    max_model_len: int | None
    """The engine's, when it said."""
    context_length: int


async def generate(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    """Admit the request, then answer it from the engine."""
    return await answer(await admit(request, endpoint))


async def admit(request: web.Request, endpoint: Endpoint) -> Exchange:
    """Every admission step, in order; the admitted request, ready for the engine."""
    app = request.app
    record = request[RECORD]
    record.endpoint = endpoint.name
    config = app[CONFIG].current
    gate, supervisor = app[GATE], app[SUPERVISOR]
    body, finite = await read_json_object(request)
    view = endpoint.parse(body)
    record.model = view.model[:MODEL_NAME_LOGGED] if view.model else view.model
    if app[LIFECYCLE].draining:
        raise EngineUnavailable(
            "The gateway is shutting down.", retry_after_s=5, cause=Cause.DRAINING
        )
    fp = fingerprint(body, config.isolation.fingerprint_ignore_set)
    record.fields["fingerprint"] = fp
    gate.check_quarantine(fp)
    # The named model's (an alias's, its model's): its deadline, its prechecks.
    policy = policy_of(config, supervisor, view.model)
    deadline = time.monotonic() + policy.deadline_s
    refusal = precheck(view, policy)
    if refusal is not None:
        _reject(record, refusal)
    if not supervisor.is_ready():
        held = time.perf_counter()
        await gate.wait_engine(deadline, view.model)
        record.held += time.perf_counter() - held
    record.model = model = _served_model(view.model, supervisor.models)
    target = _target(config, supervisor, model, policy if model == view.model else None)
    if not target.policy.trust_request_chat_template and _brings_a_template(body):
        raise BadRequest(UNTRUSTED_TEMPLATE)
    limited = await limit_request(
        app[VOCABULARIES], record.fields, body, chat=endpoint.chat, policy=target.policy
    )
    body = limited.body  # without the fields the policy strips
    prompt_tokens = await gate.exchange(  # may ask /tokenize: settled like a generation
        lambda: _prompt_tokens(request, endpoint, view, body, target), deadline
    )
    decision = decide(view, target.policy, prompt_tokens, target.context_length)
    if isinstance(decision, Reject):
        _reject(record, decision)
    decision = limit_output(decision, limited, view, target.policy, record.fields)
    _count_admit(record, decision)
    record.fields.update(decision.log_fields)
    record.fields["prompt_tokens"] = max(prompt_tokens)
    return Exchange.of(
        request,
        path=endpoint.path,
        chat=endpoint.chat,
        body=decision.rewrite(body),
        client_headers=decision.headers,
        model=target.model,
        fingerprint=fp,
        max_in_flight=target.policy.max_in_flight,
        deadline=deadline,
        share=_share(request, target.policy),
        finite=finite,
    )


def _share(request: web.Request, policy: Policy) -> ClientShare | None:
    """The client's share of the bulkhead, when the policy sets one."""
    if policy.max_in_flight_per_client is None:
        return None
    peer = request.remote
    return ClientShare(
        client_key(request.headers.get("Authorization"), peer), policy.max_in_flight_per_client
    )


def _target(
    config: Config, supervisor: EngineSupervisor, model: str, policy: Policy | None
) -> Target:
    """A served model with its policy (looked up unless the caller has it) and the context
    length to decide with (503 while unknown)."""
    if policy is None:
        policy = policy_of(config, supervisor, model)
    max_model_len = supervisor.models.get(model)
    context_length = context_length_for(policy, max_model_len)
    if context_length is None:  # the engine did not say; only the policy could
        raise EngineUnavailable(
            "The engine's context length is not known yet.",
            retry_after_s=supervisor.retry_after_s(),
            cause=Cause.ENGINE_STARTING,
        )
    return Target(model, policy, max_model_len, context_length)


def policy_of(config: Config, supervisor: EngineSupervisor, model: str | None) -> Policy:
    """The policy of a model name: its own entry, else its model's (gateway.aliases)."""
    return config.policy_for(policy_name(model, supervisor.model_families, config.models))


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


def _reject(record: RequestRecord, refusal: Reject) -> NoReturn:
    """Answer a refusal; its fields go to the log line."""
    record.fields.update(refusal.log_fields)
    record.policy_action, record.policy_reason = "rejected", refusal.reason.value
    raise refusal.error


def _count_admit(record: RequestRecord, admit: Admit) -> None:
    """What the policy did, for the metrics (report mode: a would-be refusal wins)."""
    if admit.would_reject is not None:
        record.policy_action = "would_reject"
        record.policy_reason = admit.would_reject.reason.value
    else:
        record.policy_action = action_label(admit.action.value)


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
    request: web.Request, endpoint: Endpoint, view: View, body: dict[str, Any], target: Target
) -> list[int]:
    """Per prompt, a count that decides as the exact one would: the cheap upper bound when
    it is below every threshold of the policy, else the exact count (one render either way)."""
    counter = request.app[TOKENS].counter(target.model, target.policy)
    limit = exact_count_above(view, target.policy, target.context_length)
    refuse_at = refused_from(target.policy, target.context_length)
    if endpoint.chat:
        count = await counter.count_chat_within(
            body, limit, max_model_len=target.max_model_len, refuse_at=refuse_at
        )
        return [count.tokens]
    counts = await counter.count_completion_within(
        body, limit, max_model_len=target.max_model_len, refuse_at=refuse_at
    )
    return [c.tokens for c in counts]
