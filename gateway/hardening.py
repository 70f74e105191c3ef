"""The request limits as steps of the request path: where `gateway.limits` meets the
request's log fields, its model's vocabulary and the relayed paths.

Two steps for a generation request, each one call from the path:
- `limit_request`, after the served model and its policy are known and before counting: a
  refusal is raised (its fields in the log line), a stripped body returned;
- `limit_output`, after the admission decision: the output budget (n x max_tokens), then the
  report-mode finding of the first step attached to the decision (`would-reject` header).

And one for the relayed `/tokenize` and `/v1/embeddings` (`limit_relay`). A request that uses
none of the fields the limits read is not looked at further (`limits.watched`): it neither
reads the vocabulary nor copies its body.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from gateway.config import Config, Policy
from gateway.limits import (
    Checked,
    check_embeddings,
    check_generation,
    check_output_budget,
    check_tokenize,
    limit_class,
    watched,
)
from gateway.policy import HEADER_WOULD_REJECT, Admit, Reject
from gateway.schemas import RequestView
from gateway.vocab import Vocabularies

RELAY_CHECKS = {"/tokenize": check_tokenize, "/v1/embeddings": check_embeddings}
"""Relayed paths whose bodies the limits read."""


async def limit_request(
    vocabs: Vocabularies,
    fields: dict[str, Any],
    body: dict[str, Any],
    *,
    chat: bool,
    policy: Policy,
) -> Checked:
    """The limits of a generation request: raises the refusal, else what to go on with."""
    limits = policy.limits
    if not watched(body, chat=chat, limits=limits):
        return Checked(body)
    vocab = await vocabs.for_policy(policy)
    checked = check_generation(body, chat=chat, limits=limits, vocab=vocab, mode=policy.mode)
    fields.update(checked.log_fields)
    if checked.refusal is not None:
        raise checked.refusal.error
    return checked


def limit_output(
    decision: Admit,
    checked: Checked,
    view: RequestView,
    policy: Policy,
    fields: dict[str, Any],
) -> Admit:
    """The output budget after the decision; raises its refusal. The first step's report-mode
    finding is attached when the decision has none of its own."""
    budget = check_output_budget(decision, view, checked.body, policy.limits, policy.on_exceed)
    if isinstance(budget, Reject):
        fields.update(budget.log_fields)
        fields["limit_class"] = limit_class(budget)
        raise budget.error
    if checked.would_reject is not None and budget.would_reject is None:
        budget = replace(budget, would_reject=checked.would_reject)
    return budget


async def limit_relay(
    vocabs: Vocabularies, config: Config, path: str, raw: bytes, fields: dict[str, Any]
) -> tuple[bytes, dict[str, str]]:
    """A relayed body after the limits of its path: the bytes to forward (re-encoded only
    when a field was stripped) and headers for the client; raises the refusal. A body that is
    not a JSON object is forwarded as it is: the engine answers for it."""
    check = RELAY_CHECKS.get(path)
    if check is None or not raw:
        return raw, {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return raw, {}
    if not isinstance(body, dict):
        return raw, {}
    model = body.get("model")
    policy = config.policy_for(model if isinstance(model, str) else None)
    vocab = await vocabs.for_policy(policy) if path == "/v1/embeddings" else None
    checked = check(body, limits=policy.limits, vocab=vocab, mode=policy.mode)
    fields.update(checked.log_fields)
    if checked.refusal is not None:
        raise checked.refusal.error
    headers = {}
    if checked.would_reject is not None:
        headers[HEADER_WOULD_REJECT] = checked.would_reject.reason.value
    if checked.stripped:
        raw = json.dumps(checked.body, ensure_ascii=False).encode()
    return raw, headers
