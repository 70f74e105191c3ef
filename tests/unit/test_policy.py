"""The admission decision, table by table: no server, no tokenizer, no clock."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gateway.config import OnExceed, Policy, PolicyMode
from gateway.errors import BadRequest
from gateway.policy import (
    HEADER_MAX_TOKENS,
    HEADER_WOULD_REJECT,
    Action,
    Admit,
    Reason,
    Reject,
    context_length_for,
    decide,
    exact_count_above,
    precheck,
)
from gateway.schemas import ChatView, CompletionView, RequestView, parse_chat, parse_completion

CTX = 2048
"""The context length of every table unless a row says otherwise."""

MESSAGES = [{"role": "user", "content": "Hello"}]


def chat_view(**fields: Any) -> ChatView:
    return parse_chat({"model": "tiny", "messages": MESSAGES, **fields})


def completion_view(prompt: object = "Hello", **fields: Any) -> CompletionView:
    return parse_completion({"model": "tiny", "prompt": prompt, **fields})


def policy(**fields: Any) -> Policy:
    """The tables' policy: default 256, limit 1024, clamp, enforce, max_n 8, max_prompts 16."""
    values: dict[str, Any] = {
        "default_max_tokens": 256,
        "max_tokens_limit": 1024,
        "max_n": 8,
        "max_prompts": 16,
    }
    values.update(fields)
    return Policy(**values)


def admitted(result: Admit | Reject) -> Admit:
    assert isinstance(result, Admit), result
    return result


def rejected(result: Admit | Reject) -> Reject:
    assert isinstance(result, Reject), result
    return result


# --- enforce mode: admitted --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("view", "prompt_tokens", "pol", "action", "max_tokens", "header"),
    [
        # A missing limit: the policy default, unless the window is smaller.
        (chat_view(), [100], policy(), Action.DEFAULTED, 256, "defaulted 256"),
        (chat_view(max_tokens=None), [100], policy(), Action.DEFAULTED, 256, "defaulted 256"),
        (
            chat_view(max_completion_tokens=None),
            [100],
            policy(),
            Action.DEFAULTED,
            256,
            "defaulted 256",
        ),
        (chat_view(), [1792], policy(), Action.DEFAULTED, 256, "defaulted 256"),
        (chat_view(), [1793], policy(), Action.DEFAULTED, 255, "defaulted 255"),
        (chat_view(), [1900], policy(), Action.DEFAULTED, 148, "defaulted 148"),
        (chat_view(), [CTX - 1], policy(), Action.DEFAULTED, 1, "defaulted 1"),
        (
            chat_view(),
            [100],
            policy(default_max_tokens=2000),
            Action.DEFAULTED,
            1024,
            "defaulted 1024",
        ),
        (completion_view(), [100], policy(), Action.DEFAULTED, 256, "defaulted 256"),
        # A limit within both the policy limit and the window is kept.
        (chat_view(max_tokens=100), [100], policy(), Action.KEPT, 100, "kept 100"),
        (chat_view(max_tokens=5.0), [100], policy(), Action.KEPT, 5, "kept 5"),
        (chat_view(max_tokens=1), [CTX - 1], policy(), Action.KEPT, 1, "kept 1"),
        (chat_view(max_tokens=1024), [100], policy(), Action.KEPT, 1024, "kept 1024"),
        (chat_view(max_tokens=448), [1600], policy(), Action.KEPT, 448, "kept 448"),
        (chat_view(max_completion_tokens=300), [100], policy(), Action.KEPT, 300, "kept 300"),
        (
            chat_view(max_tokens=2000, max_completion_tokens=300),
            [100],
            policy(),
            Action.KEPT,
            300,
            "kept 300",
        ),
        (completion_view(max_tokens=16), [100], policy(), Action.KEPT, 16, "kept 16"),
        # Over the policy limit or the window: clamped to the smaller of the two.
        (chat_view(max_tokens=1025), [100], policy(), Action.CLAMPED, 1024, "clamped 1025->1024"),
        (chat_view(max_tokens=4096), [100], policy(), Action.CLAMPED, 1024, "clamped 4096->1024"),
        (chat_view(max_tokens=449), [1600], policy(), Action.CLAMPED, 448, "clamped 449->448"),
        (chat_view(max_tokens=4096), [1600], policy(), Action.CLAMPED, 448, "clamped 4096->448"),
        (chat_view(max_tokens=2), [CTX - 1], policy(), Action.CLAMPED, 1, "clamped 2->1"),
        (
            chat_view(max_tokens=10, max_completion_tokens=2000),
            [100],
            policy(),
            Action.CLAMPED,
            1024,
            "clamped 2000->1024",
        ),
        (
            completion_view(max_tokens=4096),
            [1600],
            policy(),
            Action.CLAMPED,
            448,
            "clamped 4096->448",
        ),
        # Prompts up to max_prompt_tokens, n and best_of up to max_n, up to max_prompts prompts.
        (
            chat_view(),
            [1000],
            policy(max_prompt_tokens=1000),
            Action.DEFAULTED,
            256,
            "defaulted 256",
        ),
        (chat_view(n=8), [100], policy(), Action.DEFAULTED, 256, "defaulted 256"),
        (completion_view(best_of=8, n=2), [100], policy(), Action.DEFAULTED, 256, "defaulted 256"),
        (completion_view(["p"] * 16), [1] * 16, policy(), Action.DEFAULTED, 256, "defaulted 256"),
        # Several prompts share one max_tokens: the longest sets the window.
        (
            completion_view(["a", "b", "c"]),
            [10, 1900, 5],
            policy(),
            Action.DEFAULTED,
            148,
            "defaulted 148",
        ),
        (
            completion_view([[1, 2], [3]], max_tokens=500),
            [10, 1600],
            policy(),
            Action.CLAMPED,
            448,
            "clamped 500->448",
        ),
        (completion_view([1, 2, 3], max_tokens=500), [3], policy(), Action.KEPT, 500, "kept 500"),
    ],
)
def test_enforce_admits(
    view: RequestView,
    prompt_tokens: list[int],
    pol: Policy,
    action: Action,
    max_tokens: int,
    header: str,
) -> None:
    """In enforce mode a request that breaks no rule is admitted with the limit the rules give."""
    admit = admitted(decide(view, pol, prompt_tokens, CTX))
    assert (admit.action, admit.max_tokens, admit.max_tokens_header) == (action, max_tokens, header)
    assert admit.would_reject is None
    assert admit.headers == {HEADER_MAX_TOKENS: header}


# --- enforce mode: refused ---------------------------------------------------------------------


def context_message(prompt: int, overflow: str) -> str:
    return (
        f"This model's maximum context length is {CTX} tokens. However, your prompt contains "
        f"{prompt} input tokens, which {overflow}. Please reduce the length of the input "
        f"prompt. (parameter=input_tokens, value={prompt})"
    )


NO_ROOM = "leaves no room for any output tokens"
EXCEEDS = "exceeds this limit even without any output tokens"
PROMPT_POLICY = (
    "This server accepts at most 1000 input tokens per prompt for this model (its "
    "max_prompt_tokens policy). However, your prompt contains 1001 input tokens. "
    "Please reduce the length of the input prompt. "
    "(parameter=input_tokens, value=1001)"
)


def limit_message(requested: int, param: str = "max_tokens") -> str:
    return (
        f"'max_tokens' or 'max_completion_tokens' is too large: {requested}. This server "
        f"limits output to 1024 tokens per request for this model (its max_tokens_limit "
        f"policy) ({requested} > 1024). (parameter={param}, value={requested})"
    )


def window_message(requested: int, prompt: int, param: str = "max_tokens") -> str:
    return (
        f"'max_tokens' or 'max_completion_tokens' is too large: {requested}. This model's "
        f"maximum context length is {CTX} tokens and your request has {prompt} input tokens "
        f"({requested} > {CTX} - {prompt}). (parameter={param}, value={requested})"
    )


REJECT = policy(on_exceed=OnExceed.REJECT)


@pytest.mark.parametrize(
    ("view", "prompt_tokens", "pol", "reason", "param", "message"),
    [
        # The prompt must leave room for output: the engine's words.
        (
            chat_view(),
            [CTX],
            policy(),
            Reason.CONTEXT_LENGTH,
            "input_tokens",
            context_message(CTX, NO_ROOM),
        ),
        (
            chat_view(),
            [CTX + 1],
            policy(),
            Reason.CONTEXT_LENGTH,
            "input_tokens",
            context_message(CTX + 1, EXCEEDS),
        ),
        (
            chat_view(max_tokens=1),
            [CTX],
            policy(),
            Reason.CONTEXT_LENGTH,
            "input_tokens",
            context_message(CTX, NO_ROOM),
        ),
        (
            completion_view(["a", "b"]),
            [10, CTX],
            policy(),
            Reason.CONTEXT_LENGTH,
            "input_tokens",
            context_message(CTX, NO_ROOM),
        ),
        (
            chat_view(),
            [CTX + 1],
            policy(max_prompt_tokens=1000),
            Reason.CONTEXT_LENGTH,
            "input_tokens",
            context_message(CTX + 1, EXCEEDS),
        ),
        # The policy's own prompt limit names the policy, not the context length.
        (
            chat_view(),
            [1001],
            policy(max_prompt_tokens=1000),
            Reason.MAX_PROMPT_TOKENS,
            "input_tokens",
            PROMPT_POLICY,
        ),
        (
            completion_view([[1], [2]]),
            [3, 1001],
            policy(max_prompt_tokens=1000),
            Reason.MAX_PROMPT_TOKENS,
            "input_tokens",
            PROMPT_POLICY,
        ),
        # on_exceed: reject names the limit that binds, and the parameter the client sent.
        (
            chat_view(max_tokens=1025),
            [100],
            REJECT,
            Reason.MAX_TOKENS_LIMIT,
            "max_tokens",
            limit_message(1025),
        ),
        (
            chat_view(max_tokens=4096),
            [100],
            REJECT,
            Reason.MAX_TOKENS_LIMIT,
            "max_tokens",
            limit_message(4096),
        ),
        (
            chat_view(max_completion_tokens=1025),
            [100],
            REJECT,
            Reason.MAX_TOKENS_LIMIT,
            "max_completion_tokens",
            limit_message(1025, "max_completion_tokens"),
        ),
        (
            chat_view(max_tokens=449),
            [1600],
            REJECT,
            Reason.MAX_TOKENS_CONTEXT,
            "max_tokens",
            window_message(449, 1600),
        ),
        (
            chat_view(max_tokens=4096),
            [1600],
            REJECT,
            Reason.MAX_TOKENS_CONTEXT,
            "max_tokens",
            window_message(4096, 1600),
        ),
        (
            chat_view(max_tokens=2),
            [CTX - 1],
            REJECT,
            Reason.MAX_TOKENS_CONTEXT,
            "max_tokens",
            window_message(2, CTX - 1),
        ),
        (
            chat_view(max_tokens=1, max_completion_tokens=500),
            [1600],
            REJECT,
            Reason.MAX_TOKENS_CONTEXT,
            "max_completion_tokens",
            window_message(500, 1600, "max_completion_tokens"),
        ),
        (
            completion_view(["a", "b"], max_tokens=449),
            [1600, 3],
            REJECT,
            Reason.MAX_TOKENS_CONTEXT,
            "max_tokens",
            window_message(449, 1600),
        ),
        # n and best_of: at most max_n.
        (
            chat_view(n=9),
            [100],
            policy(),
            Reason.MAX_N,
            "n",
            "n must be at most 8, got 9 (this server's max_n policy for this model).",
        ),
        (
            completion_view(n=9.0),
            [100],
            policy(),
            Reason.MAX_N,
            "n",
            "n must be at most 8, got 9 (this server's max_n policy for this model).",
        ),
        (
            completion_view(best_of=9),
            [100],
            policy(),
            Reason.MAX_N,
            "best_of",
            "best_of must be at most 8, got 9 (this server's max_n policy for this model).",
        ),
        (
            chat_view(best_of=20, n=2),
            [100],
            policy(max_n=4),
            Reason.MAX_N,
            "best_of",
            "best_of must be at most 4, got 20 (this server's max_n policy for this model).",
        ),
        # The number of prompts: at most max_prompts.
        (
            completion_view(["p"] * 17),
            [1] * 17,
            policy(),
            Reason.MAX_PROMPTS,
            "prompt",
            "prompt list length 17 exceeds the maximum allowed count of 16 (this server's "
            "max_prompts policy for this model).",
        ),
        (
            completion_view([[1]] * 3),
            [1] * 3,
            policy(max_prompts=2),
            Reason.MAX_PROMPTS,
            "prompt",
            "prompt list length 3 exceeds the maximum allowed count of 2 (this server's "
            "max_prompts policy for this model).",
        ),
        # The first broken rule is the one reported.
        (
            completion_view(["p"] * 17, n=9, max_tokens=5000),
            [CTX] * 17,
            REJECT,
            Reason.MAX_PROMPTS,
            "prompt",
            "prompt list length 17 exceeds the maximum allowed count of 16 (this server's "
            "max_prompts policy for this model).",
        ),
        (
            chat_view(n=9, max_tokens=5000),
            [CTX],
            REJECT,
            Reason.MAX_N,
            "n",
            "n must be at most 8, got 9 (this server's max_n policy for this model).",
        ),
        (
            chat_view(max_tokens=5000),
            [CTX],
            REJECT,
            Reason.CONTEXT_LENGTH,
            "input_tokens",
            context_message(CTX, NO_ROOM),
        ),
    ],
)
def test_enforce_rejects(
    view: RequestView,
    prompt_tokens: list[int],
    pol: Policy,
    reason: Reason,
    param: str,
    message: str,
) -> None:
    """In enforce mode a request that breaks a rule is a 400 naming the rule and parameter."""
    reject = rejected(decide(view, pol, prompt_tokens, CTX))
    assert reject.reason is reason
    assert isinstance(reject.error, BadRequest)
    assert reject.error.body() == {
        "error": {"message": message, "type": "BadRequestError", "param": param, "code": 400}
    }
    assert reject.log_fields == {"reason": reason.value, "param": param, "message": message}


# --- report mode -------------------------------------------------------------------------------

REPORT = PolicyMode.REPORT


@pytest.mark.parametrize(
    ("view", "prompt_tokens", "pol", "action", "max_tokens", "header", "would_reject"),
    [
        (chat_view(max_tokens=100), [100], policy(mode=REPORT), Action.KEPT, 100, "kept 100", None),
        # A missing limit is still filled.
        (chat_view(), [100], policy(mode=REPORT), Action.DEFAULTED, 256, "defaulted 256", None),
        (chat_view(), [1900], policy(mode=REPORT), Action.DEFAULTED, 148, "defaulted 148", None),
        # Clamps are only reported: the client's value is forwarded.
        (
            chat_view(max_tokens=4096),
            [1600],
            policy(mode=REPORT),
            Action.WOULD_CLAMP,
            4096,
            "would-clamp 4096->448",
            None,
        ),
        (
            chat_view(max_completion_tokens=1025),
            [100],
            policy(mode=REPORT),
            Action.WOULD_CLAMP,
            1025,
            "would-clamp 1025->1024",
            None,
        ),
        # Refusals are only reported.
        (
            chat_view(max_tokens=1025),
            [100],
            policy(mode=REPORT, on_exceed=OnExceed.REJECT),
            Action.WOULD_REJECT,
            1025,
            "would-reject 1025",
            Reason.MAX_TOKENS_LIMIT,
        ),
        (
            chat_view(max_tokens=449),
            [1600],
            policy(mode=REPORT, on_exceed=OnExceed.REJECT),
            Action.WOULD_REJECT,
            449,
            "would-reject 449",
            Reason.MAX_TOKENS_CONTEXT,
        ),
        (
            chat_view(n=9),
            [100],
            policy(mode=REPORT),
            Action.DEFAULTED,
            256,
            "defaulted 256",
            Reason.MAX_N,
        ),
        (
            completion_view(best_of=9, max_tokens=10),
            [100],
            policy(mode=REPORT),
            Action.KEPT,
            10,
            "kept 10",
            Reason.MAX_N,
        ),
        (
            completion_view(["p"] * 17),
            [1] * 17,
            policy(mode=REPORT),
            Action.DEFAULTED,
            256,
            "defaulted 256",
            Reason.MAX_PROMPTS,
        ),
        (
            chat_view(),
            [1001],
            policy(mode=REPORT, max_prompt_tokens=1000),
            Action.DEFAULTED,
            256,
            "defaulted 256",
            Reason.MAX_PROMPT_TOKENS,
        ),
        (
            chat_view(max_tokens=100),
            [CTX],
            policy(mode=REPORT),
            Action.KEPT,
            100,
            "kept 100",
            Reason.CONTEXT_LENGTH,
        ),
        # A prompt with no room left still gets a positive limit: the policy default.
        (
            chat_view(),
            [CTX],
            policy(mode=REPORT),
            Action.DEFAULTED,
            256,
            "defaulted 256",
            Reason.CONTEXT_LENGTH,
        ),
        (
            chat_view(),
            [CTX + 500],
            policy(mode=REPORT),
            Action.DEFAULTED,
            256,
            "defaulted 256",
            Reason.CONTEXT_LENGTH,
        ),
        (
            chat_view(max_tokens=4096),
            [CTX + 1],
            policy(mode=REPORT),
            Action.WOULD_CLAMP,
            4096,
            "would-clamp 4096->1024",
            Reason.CONTEXT_LENGTH,
        ),
    ],
)
def test_report_mode(
    view: RequestView,
    prompt_tokens: list[int],
    pol: Policy,
    action: Action,
    max_tokens: int,
    header: str,
    would_reject: Reason | None,
) -> None:
    """In report mode nothing is refused or clamped; what enforce would do shows in headers."""
    admit = admitted(decide(view, pol, prompt_tokens, CTX))
    assert (admit.action, admit.max_tokens, admit.max_tokens_header) == (action, max_tokens, header)
    expected_headers = {HEADER_MAX_TOKENS: header}
    if would_reject is None:
        assert admit.would_reject is None
    else:
        assert admit.would_reject is not None
        assert admit.would_reject.reason is would_reject
        expected_headers[HEADER_WOULD_REJECT] = would_reject.value
        assert admit.log_fields["would_reject"] == would_reject.value
    assert admit.headers == expected_headers


@pytest.mark.parametrize(
    ("view", "prompt_tokens", "on_exceed"),
    [
        (chat_view(max_tokens=1025), [100], OnExceed.REJECT),
        (chat_view(max_tokens=4096), [1600], OnExceed.CLAMP),
        (chat_view(n=9), [100], OnExceed.CLAMP),
        (chat_view(), [CTX + 1], OnExceed.CLAMP),
        (completion_view(["p"] * 17), [1] * 17, OnExceed.CLAMP),
    ],
)
def test_report_mode_refuses_what_enforce_refuses(
    view: RequestView, prompt_tokens: list[int], on_exceed: OnExceed
) -> None:
    """Report mode's would-reject is exactly the refusal enforce mode answers."""
    enforce = decide(view, policy(on_exceed=on_exceed), prompt_tokens, CTX)
    report = admitted(decide(view, policy(on_exceed=on_exceed, mode=REPORT), prompt_tokens, CTX))
    if isinstance(enforce, Reject):
        assert report.would_reject is not None
        assert report.would_reject.reason is enforce.reason
        assert report.would_reject.error.message == enforce.error.message
    else:
        assert enforce.action is Action.CLAMPED
        assert report.enforced == enforce.max_tokens


# --- log fields --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("view", "pol", "fields"),
    [
        (
            chat_view(),
            policy(),
            {
                "policy_mode": "enforce",
                "max_tokens_action": "defaulted",
                "max_tokens": 256,
                "max_tokens_requested": None,
            },
        ),
        (
            chat_view(max_tokens=4096),
            policy(),
            {
                "policy_mode": "enforce",
                "max_tokens_action": "clamped",
                "max_tokens": 448,
                "max_tokens_requested": 4096,
            },
        ),
        (
            chat_view(max_tokens=4096),
            policy(mode=REPORT),
            {
                "policy_mode": "report",
                "max_tokens_action": "would-clamp",
                "max_tokens": 4096,
                "max_tokens_requested": 4096,
                "max_tokens_enforced": 448,
            },
        ),
    ],
)
def test_admit_log_fields(view: RequestView, pol: Policy, fields: dict[str, object]) -> None:
    """The log fields say the mode, the action, and the limits requested, forwarded, enforced."""
    assert admitted(decide(view, pol, [1600], CTX)).log_fields == fields


# --- the rewrite -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "prompt", "expected"),
    [
        ({}, 100, {"max_tokens": 256}),
        ({"max_tokens": None}, 100, {"max_tokens": 256}),
        ({"max_tokens": 5.0}, 100, {"max_tokens": 5}),
        ({"max_tokens": 4096}, 1600, {"max_tokens": 448}),
        ({"max_completion_tokens": 300}, 100, {"max_tokens": 300, "max_completion_tokens": 300}),
        (
            {"max_completion_tokens": 4096, "max_tokens": 7},
            1600,
            {"max_tokens": 448, "max_completion_tokens": 448},
        ),
        (
            {"max_completion_tokens": None, "max_tokens": 7},
            100,
            {"max_tokens": 7, "max_completion_tokens": None},
        ),
    ],
)
def test_rewrite(sent: dict[str, Any], prompt: int, expected: dict[str, Any]) -> None:
    """The forwarded body carries the decided limit in max_tokens (and max_completion_tokens
    where the client sent it); every other field is as sent and the original is untouched."""
    body = {
        "model": "tiny",
        "messages": MESSAGES,
        "temperature": 0.3,
        "response_format": {"type": "json_object"},
        **sent,
    }
    before = copy.deepcopy(body)
    admit = admitted(decide(parse_chat(body), policy(), [prompt], CTX))
    forwarded = admit.rewrite(body)
    assert body == before
    assert forwarded == {**before, **expected}
    assert type(forwarded["max_tokens"]) is int


def test_report_mode_rewrite_forwards_the_clients_limit() -> None:
    """Report mode forwards the client's own limit, made explicit in max_tokens for old engines."""
    body = {"messages": MESSAGES, "max_completion_tokens": 4096}
    admit = admitted(decide(parse_chat(body), policy(mode=REPORT), [1600], CTX))
    assert admit.rewrite(body) == {**body, "max_tokens": 4096}


# --- properties --------------------------------------------------------------------------------

LIMITS = st.integers(min_value=1, max_value=5000)
REQUESTED = (
    st.none()
    | st.integers(min_value=1, max_value=10**6)
    | st.integers(min_value=1, max_value=5000).map(float)
)


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    return Policy(
        default_max_tokens=draw(LIMITS),
        max_tokens_limit=draw(LIMITS),
        on_exceed=draw(st.sampled_from(OnExceed)),
        max_prompt_tokens=draw(st.none() | LIMITS),
        max_n=draw(st.integers(1, 10)),
        max_prompts=draw(st.integers(1, 5)),
        mode=draw(st.sampled_from(PolicyMode)),
    )


@st.composite
def requests(draw: st.DrawFn) -> tuple[dict[str, Any], RequestView, int]:
    """A body with unknown fields, its view and its number of prompts."""
    fields: dict[str, Any] = {
        "temperature": draw(st.floats(0, 2)),
        "seed": draw(st.integers()),
        "x-unknown": draw(st.lists(st.text(max_size=3), max_size=2)),
    }
    for name in ("max_tokens", "n"):
        if draw(st.booleans()):
            fields[name] = draw(REQUESTED) if name == "max_tokens" else draw(st.integers(1, 12))
    if draw(st.booleans()):
        if draw(st.booleans()):
            fields["max_completion_tokens"] = draw(REQUESTED)
        body = {"messages": MESSAGES, **fields}
        return body, parse_chat(body), 1
    prompts = draw(st.integers(1, 7))
    body = {"prompt": ["p"] * prompts if prompts > 1 else "p", **fields}
    return body, parse_completion(body), prompts


@settings(max_examples=500, deadline=None)
@given(
    request=requests(),
    pol=policies(),
    data=st.data(),
    context_length=st.integers(min_value=1, max_value=8192),
)
def test_forwarded_body_always_has_a_positive_limit(
    request: tuple[dict[str, Any], RequestView, int],
    pol: Policy,
    data: st.DataObject,
    context_length: int,
) -> None:
    """Whatever is admitted is forwarded with a positive int max_tokens that, in enforce mode,
    fits the policy limit and the window, with unknown fields untouched."""
    body, view, prompts = request
    counts = data.draw(
        st.lists(st.integers(0, context_length + 100), min_size=prompts, max_size=prompts)
    )
    before = copy.deepcopy(body)
    result = decide(view, pol, counts, context_length)
    if isinstance(result, Reject):
        assert pol.mode is PolicyMode.ENFORCE
        assert result.error.status == 400
        return
    forwarded = result.rewrite(body)
    assert body == before
    limit = forwarded["max_tokens"]
    assert type(limit) is int
    assert limit >= 1
    assert limit == result.max_tokens
    if "max_completion_tokens" in body and body["max_completion_tokens"] is not None:
        assert forwarded["max_completion_tokens"] == limit
    assert {
        k: v for k, v in forwarded.items() if k not in ("max_tokens", "max_completion_tokens")
    } == {k: v for k, v in before.items() if k not in ("max_tokens", "max_completion_tokens")}
    if pol.mode is PolicyMode.ENFORCE:
        assert limit <= pol.max_tokens_limit
        assert max(counts) + limit <= context_length
        assert result.would_reject is None
    elif view.requested_max_tokens is not None:
        assert limit == view.requested_max_tokens


@settings(max_examples=500, deadline=None)
@given(
    request=requests(),
    pol=policies(),
    data=st.data(),
    context_length=st.integers(min_value=1, max_value=8192),
)
def test_a_bound_up_to_exact_count_above_is_safe(
    request: tuple[dict[str, Any], RequestView, int],
    pol: Policy,
    data: st.DataObject,
    context_length: int,
) -> None:
    """A bound at most exact_count_above: every count up to it decides as the bound does."""
    _, view, prompts = request
    bound = data.draw(st.integers(0, context_length + 10))
    assume(bound <= exact_count_above(view, pol, context_length))
    exact = data.draw(st.lists(st.integers(0, bound), min_size=prompts, max_size=prompts))
    assert summary(decide(view, pol, exact, context_length)) == summary(
        decide(view, pol, [bound] * prompts, context_length)
    )


def summary(result: Admit | Reject) -> tuple[object, ...]:
    if isinstance(result, Reject):
        return (result.reason,)
    reason = result.would_reject.reason if result.would_reject else None
    return (result.action, result.max_tokens, result.enforced, reason, result.max_tokens_header)


# --- the caller's helpers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("view", "pol", "bound", "expected"),
    [
        # No limit sent: the default (256) must fit beside the prompt.
        (chat_view(), policy(), 0, False),
        (chat_view(), policy(), CTX - 256, False),
        (chat_view(), policy(), CTX - 255, True),
        (chat_view(), policy(), CTX, True),
        # The default is capped by the limit.
        (chat_view(), policy(max_tokens_limit=100), CTX - 100, False),
        (chat_view(), policy(max_tokens_limit=100), CTX - 99, True),
        # A limit sent: it must fit beside the prompt.
        (chat_view(max_tokens=1000), policy(), CTX - 1000, False),
        (chat_view(max_tokens=1000), policy(), CTX - 999, True),
        (chat_view(max_tokens=5000), policy(), 0, True),
        (chat_view(max_completion_tokens=48, max_tokens=2000), policy(), 2000, False),
        (chat_view(max_completion_tokens=48, max_tokens=2000), policy(), 2001, True),
        # max_prompt_tokens is a threshold of its own.
        (chat_view(), policy(max_prompt_tokens=1000), 1000, False),
        (chat_view(), policy(max_prompt_tokens=1000), 1001, True),
        (completion_view(["a", "b"], max_tokens=10), policy(max_prompt_tokens=1000), 1000, False),
    ],
)
def test_exact_count_above(view: RequestView, pol: Policy, bound: int, expected: bool) -> None:
    """An upper bound below every threshold spares the exact count; one at or past any does not."""
    assert (bound > exact_count_above(view, pol, CTX)) is expected


@pytest.mark.parametrize(
    ("view", "pol", "reason"),
    [
        (chat_view(), policy(), None),
        (chat_view(max_tokens=5000), policy(), None),
        (chat_view(max_tokens=5000), REJECT, Reason.MAX_TOKENS_LIMIT),
        (chat_view(max_tokens=1024), REJECT, None),
        (chat_view(n=9), policy(), Reason.MAX_N),
        (completion_view(best_of=9), policy(), Reason.MAX_N),
        (completion_view(["p"] * 17), policy(), Reason.MAX_PROMPTS),
        (completion_view(["p"] * 17), policy(mode=REPORT), None),
        (chat_view(max_tokens=5000, n=9), policy(mode=REPORT, on_exceed=OnExceed.REJECT), None),
    ],
)
def test_precheck(view: RequestView, pol: Policy, reason: Reason | None) -> None:
    """The refusals that need no token count are found before counting, and agree with decide."""
    result = precheck(view, pol)
    assert (result.reason if result else None) is reason
    if result is not None:
        full = rejected(decide(view, pol, [1] * view.num_prompts, CTX))
        assert full.error.message == result.error.message


@pytest.mark.parametrize(
    ("configured", "max_model_len", "expected"),
    [
        (None, 4096, 4096),
        (2048, 4096, 2048),
        (8192, 4096, 4096),
        (2048, None, 2048),
        (None, None, None),
    ],
)
def test_context_length_for(
    configured: int | None, max_model_len: int | None, expected: int | None
) -> None:
    """The policy's context length applies when set, never beyond the engine's max_model_len."""
    assert context_length_for(policy(context_length=configured), max_model_len) == expected


@pytest.mark.parametrize(
    ("view", "counts"),
    [(chat_view(), [1, 2]), (completion_view(["a", "b"]), [1]), (chat_view(), [])],
)
def test_decide_needs_one_count_per_prompt(view: RequestView, counts: list[int]) -> None:
    """A count list that does not match the prompts is a caller's bug, not a client's 400."""
    with pytest.raises(ValueError, match="prompt token counts"):
        decide(view, policy(), counts, CTX)
