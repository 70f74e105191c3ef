"""The admission decision: a pure function of a request view, its model's policy, the exact
prompt token counts and the context length. No I/O, no clock, no aiohttp.

`decide` answers `Admit` (with the output limit to forward and how it was reached) or `Reject`
(with the `BadRequest` to answer). Whatever it admits is forwarded with an explicit, positive
`max_tokens`: an engine never sees a request without an output limit, which is what made
`max_tokens: null` kill V0 multi-step engines (kserve#3971, vllm#6707).

Rules, checked in this order (the first broken rule is the one reported):

1. `max_prompts`: a completions request holds at most that many prompts (param `prompt`).
2. `max_n`: `n`, and `best_of` when sent, at most `max_n` (param `n` / `best_of`).
3. Context: the longest prompt must leave room for output, `prompt < context_length`
   (param `input_tokens`).
4. `max_prompt_tokens`: the longest prompt at most that many tokens (param `input_tokens`).
5. Output: the requested limit (chat: `max_completion_tokens`, else `max_tokens`) is kept when
   it fits both `max_tokens_limit` and the window `context_length - prompt`; over either it is
   clamped to `min(max_tokens_limit, context_length - prompt)` or rejected, per `on_exceed`.
   A missing limit becomes `min(default_max_tokens, max_tokens_limit, context_length - prompt)`.
   One `max_tokens` applies to every prompt of a request, so the longest prompt sets the window.

In report mode nothing is rejected or clamped: the request is forwarded as sent (a missing limit
is still filled), and the headers and log fields say what enforce mode would have done.

Header vocabulary (`HEADER_MAX_TOKENS`): `kept 100`, `defaulted 256`, `clamped 4096->448`;
in report mode also `would-clamp 4096->448` and `would-reject 5000`. In report mode a request
enforce mode would refuse also carries `HEADER_WOULD_REJECT` with the `Reason`, e.g. `max_n`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from gateway.config import OnExceed, Policy, PolicyMode
from gateway.errors import BadRequest
from gateway.schemas import RequestView

HEADER_MAX_TOKENS = "X-Vllm-Guard-Max-Tokens"
HEADER_WOULD_REJECT = "X-Vllm-Guard-Would-Reject"


class Action(StrEnum):
    """What admission did to the output limit. Bounded: usable as a metric label."""

    KEPT = "kept"
    DEFAULTED = "defaulted"
    CLAMPED = "clamped"
    WOULD_CLAMP = "would-clamp"
    WOULD_REJECT = "would-reject"


class Reason(StrEnum):
    """Why a request is (or in report mode would be) refused; named for the policy field or
    engine limit it breaks. Bounded: usable as a metric label."""

    MAX_PROMPTS = "max_prompts"
    MAX_N = "max_n"
    CONTEXT_LENGTH = "context_length"
    MAX_PROMPT_TOKENS = "max_prompt_tokens"
    MAX_TOKENS_LIMIT = "max_tokens_limit"
    MAX_TOKENS_CONTEXT = "max_tokens_context"


@dataclass(frozen=True, slots=True)
class Reject:
    """Refuse the request with `error` (a 400 in vLLM's envelope)."""

    reason: StrEnum
    """A `Reason`, or a `limit_names.Limit` for a request limit."""
    error: BadRequest

    @property
    def log_fields(self) -> dict[str, object]:
        return {
            "reason": self.reason.value,
            "param": self.error.param,
            "message": self.error.message,
        }


@dataclass(slots=True)
class Admit:
    """Forward the request with `max_tokens` as its output limit."""

    max_tokens: int
    """The limit forwarded; always >= 1."""
    action: Action
    requested: int | None
    """What the client asked for; None when it sent no limit."""
    enforced: int | None
    """What enforce mode forwards (differs from `max_tokens` for `would-clamp`); None for
    `would-reject` of the output limit."""
    mode: PolicyMode
    set_max_completion_tokens: bool
    """The client sent `max_completion_tokens`: the rewrite sets it to the same value."""
    would_reject: Reject | None = None
    """Report mode: the refusal enforce mode would have answered."""

    @property
    def max_tokens_header(self) -> str:
        """The value of `HEADER_MAX_TOKENS`."""
        if self.action is Action.CLAMPED:
            return f"clamped {self.requested}->{self.max_tokens}"
        if self.action is Action.WOULD_CLAMP:
            return f"would-clamp {self.requested}->{self.enforced}"
        return f"{self.action.value} {self.max_tokens}"

    @property
    def headers(self) -> dict[str, str]:
        """Response headers that make the decision visible to the client."""
        headers = {HEADER_MAX_TOKENS: self.max_tokens_header}
        if self.would_reject is not None:
            headers[HEADER_WOULD_REJECT] = self.would_reject.reason.value
        return headers

    @property
    def log_fields(self) -> dict[str, object]:
        """Fields for the request's log line."""
        fields: dict[str, object] = {
            "policy_mode": self.mode.value,
            "max_tokens_action": self.action.value,
            "max_tokens": self.max_tokens,
            "max_tokens_requested": self.requested,
        }
        if self.enforced != self.max_tokens:
            fields["max_tokens_enforced"] = self.enforced
        if self.would_reject is not None:
            fields["would_reject"] = self.would_reject.reason.value
            fields["would_reject_message"] = self.would_reject.error.message
        return fields

    def rewrite(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of the client's body with the output limit made explicit; every other field
        is left as sent."""
        rewritten = dict(body)
        rewritten["max_tokens"] = self.max_tokens
        if self.set_max_completion_tokens:
            rewritten["max_completion_tokens"] = self.max_tokens
        return rewritten


def decide(
    view: RequestView,
    policy: Policy,
    prompt_tokens: Sequence[int],
    context_length: int,
) -> Admit | Reject:
    """Admit or refuse one request.

    `prompt_tokens` holds the exact token count of each prompt, in order (one for chat, the
    chat-templated count); `context_length` is `context_length_for(policy, max_model_len)`.
    """
    if len(prompt_tokens) != view.num_prompts:
        raise ValueError(f"{len(prompt_tokens)} prompt token counts for {view.num_prompts} prompts")
    longest = max(prompt_tokens)
    refusal = _check_counts(view, policy) or _check_prompt(policy, longest, context_length)
    requested = view.requested_max_tokens
    room = context_length - longest
    # With no room at all the prompt is refused above; report mode still needs a positive limit.
    cap = min(policy.max_tokens_limit, room) if room >= 1 else policy.max_tokens_limit
    report = policy.mode is PolicyMode.REPORT

    if requested is None:
        enforced = min(policy.default_max_tokens, cap)
        action, forwarded = Action.DEFAULTED, enforced
    elif requested <= cap:
        action, enforced, forwarded = Action.KEPT, requested, requested
    elif policy.on_exceed is OnExceed.CLAMP:
        enforced = cap
        action, forwarded = (Action.WOULD_CLAMP, requested) if report else (Action.CLAMPED, cap)
    else:
        refusal = refusal or _output_refusal(view, policy, requested, longest, context_length)
        action, enforced, forwarded = Action.WOULD_REJECT, None, requested

    if refusal is not None and not report:
        return refusal
    return Admit(
        max_tokens=forwarded,
        action=action,
        requested=requested,
        enforced=enforced,
        mode=policy.mode,
        set_max_completion_tokens=view.sent_max_completion_tokens,
        would_reject=refusal,
    )


def precheck(view: RequestView, policy: Policy) -> Reject | None:
    """The refusals that need no token count, for the caller to answer before counting.

    `decide` checks the same rules again; this only spares the tokenizer a request that is
    refused anyway (2000 prompts when `max_prompts` is 16). Always None in report mode.
    """
    if policy.mode is PolicyMode.REPORT:
        return None
    refusal = _check_counts(view, policy)
    if refusal is not None:
        return refusal
    requested = view.requested_max_tokens
    if (
        policy.on_exceed is OnExceed.REJECT
        and requested is not None
        and requested > policy.max_tokens_limit
    ):
        return _limit_refusal(view, policy, requested)
    return None


def exact_count_above(view: RequestView, policy: Policy, context_length: int) -> int:
    """The largest upper bound on the longest prompt's token count that settles the decision
    without an exact count: a counter may answer with its bound up to this, and must count
    exactly past it.

    The decision changes with the prompt length P only at these thresholds: P >= context_length,
    P > max_prompt_tokens, and P > context_length - B, where B is the requested output limit, or
    when none was sent `min(default_max_tokens, max_tokens_limit)` (past that the window, not
    the policy, sets the limit). When the bound is below all of them, every P up to it gives the
    same action, limit and refusal, so `decide` with the bound in place of the exact counts
    answers the same; the log line then shows the bound, not the count.
    """
    requested = view.requested_max_tokens
    budget = (
        requested
        if requested is not None
        else min(policy.default_max_tokens, policy.max_tokens_limit)
    )
    limit = context_length - budget
    if policy.max_prompt_tokens is not None:
        limit = min(limit, policy.max_prompt_tokens)
    return limit


def refused_from(policy: Policy, context_length: int) -> int | None:
    """The prompt length from which a prompt is refused whatever else the request says
    (it fills the context, or passes max_prompt_tokens): a lower bound at least this
    settles the decision without an exact count. None in report mode (nothing is refused)."""
    if policy.mode is PolicyMode.REPORT:
        return None
    if policy.max_prompt_tokens is not None:
        return min(context_length, policy.max_prompt_tokens + 1)
    return context_length


def context_length_for(policy: Policy, max_model_len: int | None) -> int | None:
    """The context length to decide with: the policy's when set, never more than the engine's
    `max_model_len` when that is known; the engine's when the policy sets none."""
    if policy.context_length is None:
        return max_model_len
    if max_model_len is None:
        return policy.context_length
    return min(policy.context_length, max_model_len)


def _check_counts(view: RequestView, policy: Policy) -> Reject | None:
    num_prompts = view.num_prompts
    if num_prompts > policy.max_prompts:
        # Wording of vLLM 0.32, CompletionRequest.validate_prompt_list_length.
        return _reject(
            Reason.MAX_PROMPTS,
            "prompt",
            f"prompt list length {num_prompts} exceeds the maximum allowed count of "
            f"{policy.max_prompts} (this server's max_prompts policy for this model).",
        )
    for param, value in (("n", view.n), ("best_of", view.best_of)):
        if value is not None and value > policy.max_n:
            # Wording of vLLM 0.32, _verify_num_sequences (vllm/sampling_params.py).
            return _reject(
                Reason.MAX_N,
                param,
                f"{param} must be at most {policy.max_n}, got {value} "
                "(this server's max_n policy for this model).",
            )
    return None


def _check_prompt(policy: Policy, longest: int, context_length: int) -> Reject | None:
    if longest >= context_length:
        # vLLM 0.32, TokenizeParams._token_len_check (vllm/renderers/params.py), rendered by
        # VLLMValidationError.__str__. The engine lets a prompt of exactly the context length
        # through to fail later on max_tokens=0; the gateway refuses it here, in the same words.
        overflow = (
            "exceeds this limit even without any output tokens"
            if longest > context_length
            else "leaves no room for any output tokens"
        )
        return _reject(
            Reason.CONTEXT_LENGTH,
            "input_tokens",
            f"This model's maximum context length is {context_length} tokens. However, your "
            f"prompt contains {longest} input tokens, which {overflow}. Please reduce the "
            f"length of the input prompt. (parameter=input_tokens, value={longest})",
        )
    if policy.max_prompt_tokens is not None and longest > policy.max_prompt_tokens:
        return _reject(
            Reason.MAX_PROMPT_TOKENS,
            "input_tokens",
            f"This server accepts at most {policy.max_prompt_tokens} input tokens per prompt "
            f"for this model (its max_prompt_tokens policy). However, your prompt contains "
            f"{longest} input tokens. Please reduce the length of the input prompt. "
            f"(parameter=input_tokens, value={longest})",
        )
    return None


def _output_refusal(
    view: RequestView, policy: Policy, requested: int, longest: int, context_length: int
) -> Reject:
    # Name the limit that binds: the one the client must get under.
    if policy.max_tokens_limit <= context_length - longest:
        return _limit_refusal(view, policy, requested)
    # vLLM's message from before the renderer (OpenAIServing._validate_input in
    # vllm/entrypoints/openai/serving_engine.py), with the "(parameter=..., value=...)" tail
    # later versions append. vLLM 0.32 no longer refuses this: it shortens the output silently.
    param = view.max_tokens_param
    return _reject(
        Reason.MAX_TOKENS_CONTEXT,
        param,
        f"'max_tokens' or 'max_completion_tokens' is too large: {requested}. This model's "
        f"maximum context length is {context_length} tokens and your request has {longest} "
        f"input tokens ({requested} > {context_length} - {longest}). "
        f"(parameter={param}, value={requested})",
    )


def _limit_refusal(view: RequestView, policy: Policy, requested: int) -> Reject:
    limit, param = policy.max_tokens_limit, view.max_tokens_param
    return _reject(
        Reason.MAX_TOKENS_LIMIT,
        param,
        f"'max_tokens' or 'max_completion_tokens' is too large: {requested}. This server "
        f"limits output to {limit} tokens per request for this model (its max_tokens_limit "
        f"policy) ({requested} > {limit}). (parameter={param}, value={requested})",
    )


def _reject(reason: Reason, param: str, message: str) -> Reject:
    return Reject(reason, BadRequest(message, param=param))
