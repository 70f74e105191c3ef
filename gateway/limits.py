"""Request hardening: the request shapes known to crash or wedge vLLM, refused before the
engine sees them. Pure functions of the client's body, the model's `Limits` and vocabulary,
and the policy's mode: no I/O, no clock, no aiohttp.

Two classes (`limit_names.CRASH_CLASS`):
- crash class, refused in every mode, report mode included (as report mode still fills a
  missing max_tokens): token ids outside the vocabulary (logit_bias keys: vllm#16529;
  stop_token_ids: vllm#54195; allowed_token_ids, logprob_token_ids, token-id prompts; bad_words
  that tokenize past the output vocabulary: vllm#48824), prompt_logprobs unless the policy
  allows them (vllm#16836), invalid schemas and `$ref` loops, structured outputs where the
  policy turned them off, fields clients must not set (kv_transfer_params: vllm#51137) and
  priority unless allowed, min_tokens over a max_tokens the gateway chose, remote and file:
  media, images under the minimum side (CVE-2026-22773);
- cost class, which follows the policy's mode (enforce: 400; report: forwarded, with the
  `would-reject` header and log field): list lengths, logprobs counts, schema sizes and widths
  (gateway.schema_limits), n x max_tokens (CVE-2026-34756), stop strings, media counts and sizes
  (gateway.media_limits).

Each refusal is vLLM's 400 envelope with the field in `param`. A request that uses none of the
fields read here costs two set-disjointness tests (and, for a chat, one look at each message's
content type).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from gateway.config import ForbiddenAction, Limits, OnExceed, PolicyMode
from gateway.errors import BadRequest
from gateway.limit_names import CRASH_CLASS, Finding, Limit
from gateway.media_limits import has_media, media_findings
from gateway.policy import Action, Admit, Reject
from gateway.sampling_limits import (
    TOKEN_ID_FIELDS,
    Vocabulary,
    id_prompts,
    number,
    prompt_id_findings,
    sampling_findings,
)
from gateway.schema_limits import STRUCTURED_FIELDS, structured_findings
from gateway.schemas import RequestView

WATCHED: frozenset[str] = STRUCTURED_FIELDS | {
    *TOKEN_ID_FIELDS,
    "bad_words",
    "logprobs",
    "top_logprobs",
    "prompt_logprobs",
    "echo",
    "stop",
    "priority",
}
"""Top-level fields any check here reads (besides `limits.forbidden_fields`, the messages'
content parts and token-id prompts)."""


@dataclass(slots=True)
class Checked:
    """What the checks answer: the body to go on with, and a refusal to answer now (crash
    class, or cost class in enforce mode) or to report (cost class in report mode)."""

    body: dict[str, Any]
    """The client's body, or a copy without the fields `forbidden_action: strip` removed."""
    refusal: Reject | None = None
    would_reject: Reject | None = None
    stripped: tuple[str, ...] = ()

    @property
    def log_fields(self) -> dict[str, object]:
        fields: dict[str, object] = {}
        if self.refusal is not None:
            fields.update(self.refusal.log_fields)
            fields["limit_class"] = limit_class(self.refusal)
        if self.would_reject is not None:
            fields["would_reject"] = self.would_reject.reason.value
            fields["would_reject_message"] = self.would_reject.error.message
        if self.stripped:
            fields["stripped_fields"] = list(self.stripped)
        return fields


def limit_class(refusal: Reject) -> str:
    """ "crash" or "cost", for the log line."""
    return "crash" if refusal.reason in CRASH_CLASS else "cost"


# -- the three entry points ---------------------------------------------------------------------


def watched(body: Mapping[str, Any], *, chat: bool, limits: Limits) -> bool:
    """Whether a generation body uses anything the limits read: the one cheap test every
    request pays (two set-disjointness tests and, for a chat, each message's content type)."""
    keys = body.keys()
    if not keys.isdisjoint(WATCHED) or not keys.isdisjoint(limits.forbidden):
        return True
    if chat:
        return has_media(body.get("messages"))
    prompt = body.get("prompt")
    return isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], str)


def check_generation(
    body: dict[str, Any],
    *,
    chat: bool,
    limits: Limits,
    vocab: Vocabulary | None,
    mode: PolicyMode,
) -> Checked:
    """/v1/chat/completions (`chat`) and /v1/completions."""
    if not watched(body, chat=chat, limits=limits):
        return Checked(body)
    keys = body.keys()
    ids = None if chat else id_prompts(body.get("prompt"))
    body, stripped, findings = _fields(body, limits)
    findings.extend(sampling_findings(body, chat, limits, vocab))
    if ids:
        findings.extend(prompt_id_findings(ids, "prompt", vocab))
    found: Iterable[Finding] = findings
    if not keys.isdisjoint(STRUCTURED_FIELDS):
        found = _chain(found, structured_findings(body, limits))
    if chat:
        found = _chain(found, media_findings(body.get("messages"), limits))
    return _verdict(body, stripped, found, mode)


def check_tokenize(
    body: dict[str, Any], *, limits: Limits, vocab: Vocabulary | None, mode: PolicyMode
) -> Checked:
    """The relayed /tokenize: it renders messages (media included) and tools."""
    tools = body.get("tools")
    messages = body.get("messages")
    if tools is None and not has_media(messages) and body.keys().isdisjoint(limits.forbidden):
        return Checked(body)
    body, stripped, findings = _fields(body, limits)
    found: Iterable[Finding] = findings
    if tools is not None:
        found = _chain(found, structured_findings({"tools": tools}, limits))
    found = _chain(found, media_findings(messages, limits))
    return _verdict(body, stripped, found, mode)


def check_embeddings(
    body: dict[str, Any], *, limits: Limits, vocab: Vocabulary | None, mode: PolicyMode
) -> Checked:
    """The relayed /v1/embeddings: token-id input, chat-style messages, forbidden fields."""
    ids = id_prompts(body.get("input"))
    messages = body.get("messages")
    if not ids and not has_media(messages) and body.keys().isdisjoint(limits.forbidden):
        return Checked(body)
    body, stripped, findings = _fields(body, limits)
    if ids:
        findings.extend(prompt_id_findings(ids, "input", vocab))
    found = _chain(findings, media_findings(messages, limits))
    return _verdict(body, stripped, found, mode)


def _chain(*parts: Iterable[Finding]) -> Iterator[Finding]:
    for part in parts:
        yield from part


def _verdict(
    body: dict[str, Any], stripped: tuple[str, ...], found: Iterable[Finding], mode: PolicyMode
) -> Checked:
    """The first crash-class finding is refused; the first cost-class one is refused in
    enforce mode and reported in report mode (where the rest is still searched for a crash)."""
    cost: Reject | None = None
    for finding in found:
        refusal = Reject(finding.limit, BadRequest(finding.message, param=finding.param))
        if finding.crash or mode is PolicyMode.ENFORCE:
            return Checked(body, refusal=refusal, stripped=stripped)
        if cost is None:
            cost = refusal
    return Checked(body, would_reject=cost, stripped=stripped)


# -- fields clients must not set ------------------------------------------------------------


def _fields(
    body: dict[str, Any], limits: Limits
) -> tuple[dict[str, Any], tuple[str, ...], list[Finding]]:
    """Forbidden fields (and priority) refused, or stripped from a copy of the body."""
    present = [key for key in body if key in limits.forbidden and body[key] is not None]
    priority = body.get("priority")
    if not limits.allow_priority and priority not in (None, 0) and "priority" not in present:
        present.append("priority")
    if not present:
        return body, (), []
    if limits.forbidden_action is ForbiddenAction.STRIP:
        kept = {key: value for key, value in body.items() if key not in present}
        return kept, tuple(present), []
    findings = [
        Finding(
            Limit.PRIORITY,
            "priority",
            "priority is not accepted by this server for this model (its limits.allow_priority "
            "policy); send priority 0 or none.",
        )
        if key == "priority"
        else Finding(
            Limit.FORBIDDEN_FIELD,
            key,
            f"{key} is set by the serving system, not by clients; this server does not accept "
            "it in a request (its limits.forbidden_fields policy).",
        )
        for key in present
    ]
    return body, (), findings


# -- the output budget, after the admission decision ----------------------------------------


def check_output_budget(
    decision: Admit,
    view: RequestView,
    body: Mapping[str, Any],
    limits: Limits,
    on_exceed: OnExceed,
) -> Admit | Reject:
    """n (or best_of) x max_tokens at most `max_output_tokens_total` (cost class: lowered per
    choice under `on_exceed: clamp` or when the gateway chose the limit, else refused; reported
    in report mode); then `min_tokens` at most the max_tokens the gateway forwards (crash
    class: the engine refuses min_tokens > max_tokens, and a clamp may have made it so)."""
    choices = max(view.n or 1, view.best_of or 1)
    total = limits.max_output_tokens_total
    if choices * decision.max_tokens > total:
        refusal = Reject(
            Limit.MAX_OUTPUT_TOKENS_TOTAL,
            BadRequest(
                f"The request asks for {choices} x {decision.max_tokens} = "
                f"{choices * decision.max_tokens} output tokens; this server allows at most "
                f"{total} per request for this model (its limits.max_output_tokens_total "
                "policy). Lower n or max_tokens.",
                param="n" if choices > total else view.max_tokens_param,
            ),
        )
        per_choice = total // choices
        if decision.mode is PolicyMode.REPORT:
            if decision.would_reject is None:
                decision = replace(decision, would_reject=refusal)
        elif per_choice < 1 or (
            on_exceed is OnExceed.REJECT and decision.action is not Action.DEFAULTED
        ):
            return refusal
        else:
            action = Action.DEFAULTED if decision.action is Action.DEFAULTED else Action.CLAMPED
            decision = replace(decision, max_tokens=per_choice, enforced=per_choice, action=action)
    min_tokens = number(body.get("min_tokens"))
    if (
        min_tokens is not None
        and min_tokens > decision.max_tokens
        and decision.action in (Action.CLAMPED, Action.DEFAULTED)
    ):
        return Reject(
            Limit.MIN_TOKENS,
            BadRequest(
                f"min_tokens is {min_tokens}, more than the {decision.max_tokens} output tokens "
                f"this server gives the request (max_tokens {decision.action.value} by its "
                "policy). Lower min_tokens, or send a max_tokens within the policy.",
                param="min_tokens",
            ),
        )
    return decision


__all__ = [
    "Checked",
    "Vocabulary",
    "check_embeddings",
    "check_generation",
    "check_output_budget",
    "check_tokenize",
    "limit_class",
    "watched",
]
