"""Request views: what they accept, what they refuse, and with which words."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import BadRequest
from gateway.schemas import ChatView, CompletionView, parse_chat, parse_completion

MESSAGES = [{"role": "user", "content": "Hello"}]


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": copy.deepcopy(MESSAGES), **fields}


def completion_body(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": "Hello", **fields}


Parser = Callable[[object], ChatView | CompletionView]
BODIES: list[tuple[Parser, Callable[..., dict[str, Any]]]] = [
    (parse_chat, chat_body),
    (parse_completion, completion_body),
]
both_kinds = pytest.mark.parametrize(("parse", "body"), BODIES, ids=["chat", "completion"])


def refusal(parse: Parser, body: object) -> BadRequest:
    with pytest.raises(BadRequest) as caught:
        parse(body)
    return caught.value


# --- integer parameters ------------------------------------------------------------------------


@both_kinds
@pytest.mark.parametrize(
    ("field", "raw", "expected"),
    [
        ("max_tokens", 5, 5),
        ("max_tokens", 5.0, 5),
        ("max_tokens", 1, 1),
        ("max_tokens", None, None),
        ("max_tokens", 10**12, 10**12),
        ("n", 3, 3),
        ("n", 3.0, 3),
        ("n", None, None),
        ("best_of", 2, 2),
        ("best_of", 2.0, 2),
    ],
)
def test_integer_parameter_accepted(
    parse: Parser, body: Callable[..., dict[str, Any]], field: str, raw: object, expected: object
) -> None:
    """An integer, an integral float such as 5.0 (as vLLM accepts) and null are read exactly."""
    view = parse(body(**{field: raw}))
    value = getattr(view, field)
    assert value == expected
    assert value is None or type(value) is int


@both_kinds
@pytest.mark.parametrize(
    ("field", "raw", "message"),
    [
        ("max_tokens", True, "max_tokens must be an integer, got true."),
        ("max_tokens", False, "max_tokens must be an integer, got false."),
        ("max_tokens", "5", "max_tokens must be an integer, got a string ('5')."),
        ("max_tokens", 5.5, "max_tokens must be an integer, got 5.5."),
        ("max_tokens", math.inf, "max_tokens must be an integer, got inf."),
        ("max_tokens", math.nan, "max_tokens must be an integer, got nan."),
        ("max_tokens", [5], "max_tokens must be an integer, got a list."),
        ("max_tokens", {"v": 5}, "max_tokens must be an integer, got an object."),
        ("max_tokens", 0, "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)"),
        (
            "max_tokens",
            0.0,
            "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
        ),
        (
            "max_tokens",
            -1,
            "max_tokens must be at least 1, got -1. (parameter=max_tokens, value=-1)",
        ),
        ("n", True, "n must be an integer, got true."),
        ("n", "2", "n must be an integer, got a string ('2')."),
        ("n", 1.5, "n must be an integer, got 1.5."),
        ("n", 0, "n must be at least 1, got 0."),
        ("n", -3, "n must be at least 1, got -3."),
        ("best_of", False, "best_of must be an integer, got false."),
        ("best_of", 0, "best_of must be at least 1, got 0."),
    ],
)
def test_integer_parameter_refused(
    parse: Parser, body: Callable[..., dict[str, Any]], field: str, raw: object, message: str
) -> None:
    """A boolean, a string, a fraction, zero or a negative is a 400 that names the parameter."""
    err = refusal(parse, body(**{field: raw}))
    assert (err.status, err.type, err.param, err.message) == (
        400,
        "BadRequestError",
        field,
        message,
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (True, "max_completion_tokens must be an integer, got true."),
        ("10", "max_completion_tokens must be an integer, got a string ('10')."),
        (2.5, "max_completion_tokens must be an integer, got 2.5."),
        (
            0,
            "max_completion_tokens must be at least 1, got 0. "
            "(parameter=max_completion_tokens, value=0)",
        ),
        (
            -1,
            "max_completion_tokens must be at least 1, got -1. "
            "(parameter=max_completion_tokens, value=-1)",
        ),
    ],
)
def test_max_completion_tokens_refused(raw: object, message: str) -> None:
    """Chat's max_completion_tokens is validated like max_tokens and named in the error."""
    err = refusal(parse_chat, chat_body(max_completion_tokens=raw))
    assert (err.param, err.message) == ("max_completion_tokens", message)


@pytest.mark.parametrize(
    ("fields", "requested", "param", "sent_mct"),
    [
        ({}, None, "max_tokens", False),
        ({"max_tokens": None}, None, "max_tokens", False),
        ({"max_tokens": 10}, 10, "max_tokens", False),
        ({"max_completion_tokens": 20}, 20, "max_completion_tokens", True),
        ({"max_tokens": 10, "max_completion_tokens": 20}, 20, "max_completion_tokens", True),
        ({"max_tokens": 30, "max_completion_tokens": 5.0}, 5, "max_completion_tokens", True),
        ({"max_tokens": 10, "max_completion_tokens": None}, 10, "max_tokens", False),
        ({"max_tokens": None, "max_completion_tokens": None}, None, "max_tokens", False),
    ],
)
def test_chat_requested_output_precedence(
    fields: dict[str, Any], requested: int | None, param: str, sent_mct: bool
) -> None:
    """Chat reads max_completion_tokens when present, else max_tokens, and null is absent."""
    view = parse_chat(chat_body(**fields))
    assert view.requested_max_tokens == requested
    assert view.max_tokens_param == param
    assert view.sent_max_completion_tokens is sent_mct


def test_completion_ignores_max_completion_tokens() -> None:
    """Completions have only max_tokens: a max_completion_tokens there is an unknown field."""
    view = parse_completion(completion_body(max_tokens=10, max_completion_tokens=99))
    assert view.requested_max_tokens == 10
    assert view.model_extra == {"max_completion_tokens": 99}


# --- messages ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        (..., "messages is required: a non-empty list of message objects, each with a 'role'."),
        (None, "messages must be a list of message objects, got null."),
        ("Hello", "messages must be a list of message objects, got a string ('Hello')."),
        ({"role": "user"}, "messages must be a list of message objects, got an object."),
        ([], "messages must not be empty: send at least one message."),
        (["Hello"], "messages[0] must be an object with a 'role', got a string ('Hello')."),
        (
            [{"role": "user", "content": "a"}, 7],
            "messages[1] must be an object with a 'role', got 7.",
        ),
        ([{"content": "Hello"}], "messages[0] has no 'role'."),
        ([{"role": None, "content": "Hello"}], "messages[0].role must be a string, got null."),
        ([{"role": 1, "content": "Hello"}], "messages[0].role must be a string, got 1."),
    ],
)
def test_messages_refused(messages: object, message: str) -> None:
    """A missing, ill-typed or empty messages list, or a message without a role, is a 400."""
    body = chat_body()
    if messages is ...:
        del body["messages"]
    else:
        body["messages"] = messages
    err = refusal(parse_chat, body)
    assert (err.param, err.message) == ("messages", message)


def test_messages_pass_as_sent() -> None:
    """Messages are checked for shape only and kept as the very list the client sent."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}], "name": "x"},
        {"role": "some-future-role", "content": None, "tool_calls": []},
    ]
    view = parse_chat({"messages": messages})
    assert view.messages is messages


# --- prompts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "num_prompts", "prompts"),
    [
        ("Hello", 1, ["Hello"]),
        (["Hello", "World", ""], 3, ["Hello", "World", ""]),
        (["Hello"], 1, ["Hello"]),
        ([1, 2, 3], 1, [[1, 2, 3]]),
        ([0], 1, [[0]]),
        ([[1, 2], [3]], 2, [[1, 2], [3]]),
        ([[1, 2], [3], [4, 5, 6]], 3, [[1, 2], [3], [4, 5, 6]]),
    ],
)
def test_prompt_shapes(prompt: object, num_prompts: int, prompts: object) -> None:
    """A prompt may be text, texts, token ids or lists of token ids; each list item is a prompt."""
    view = parse_completion(completion_body(prompt=prompt))
    assert view.num_prompts == num_prompts
    assert view.prompts == prompts


NO_PROMPT = "Either prompt or prompt_embeds must be provided and non-empty."
SHAPES = "a string, a list of strings, a list of token ids, or a list of token-id lists"


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        (..., NO_PROMPT),
        (None, NO_PROMPT),
        ("", NO_PROMPT),
        ([], NO_PROMPT),
        (5, f"prompt must be {SHAPES}, got 5."),
        ({"text": "Hello"}, f"prompt must be {SHAPES}, got an object."),
        ([True, 1], f"prompt must be {SHAPES}, got a list starting with true."),
        ([-1, 2], f"prompt must be {SHAPES}, got a list starting with -1."),
        ([1.0, 2], f"prompt must be {SHAPES}, got a list starting with 1.0."),
        ([None], f"prompt must be {SHAPES}, got a list starting with null."),
        (["Hello", 1], "prompt[1] must be a string like prompt[0], got 1."),
        (["Hello", ["World"]], "prompt[1] must be a string like prompt[0], got a list."),
        ([[1], 2], "prompt[1] must be a list of token ids (integers >= 0), got 2."),
        ([[1], ["a"]], "prompt[1] must be a list of token ids (integers >= 0), got a list."),
        ([[False]], "prompt[0] must be a list of token ids (integers >= 0), got a list."),
    ],
)
def test_prompt_refused(prompt: object, message: str) -> None:
    """A missing, empty or ill-shaped prompt is a 400 on param prompt, in vLLM's words if any."""
    body = completion_body()
    if prompt is ...:
        del body["prompt"]
    else:
        body["prompt"] = prompt
    err = refusal(parse_completion, body)
    assert (err.param, err.message) == ("prompt", message)


@pytest.mark.parametrize("prompt", [..., "Hello"])
def test_prompt_embeds_refused(prompt: object) -> None:
    """prompt_embeds is refused with or without a prompt: its length cannot be checked."""
    body = completion_body(prompt_embeds="UEsDBBQ=")
    if prompt is ...:
        del body["prompt"]
    err = refusal(parse_completion, body)
    assert err.param == "prompt_embeds"
    assert "prompt_embeds is not supported" in err.message


def test_prompt_embeds_null_is_absent() -> None:
    """An explicit null prompt_embeds is the same as none."""
    assert parse_completion(completion_body(prompt_embeds=None)).num_prompts == 1


# --- the rest of the body ----------------------------------------------------------------------


@both_kinds
@pytest.mark.parametrize("payload", [[], "text", None, 3, True])
def test_body_must_be_an_object(
    parse: Parser, body: Callable[..., dict[str, Any]], payload: object
) -> None:
    """A JSON body that is not an object is a 400 without a param."""
    err = refusal(parse, payload)
    assert err.param is None
    assert err.message.startswith("The request body must be a JSON object, got ")


@both_kinds
@pytest.mark.parametrize(
    ("fields", "is_stream"),
    [
        ({}, False),
        ({"stream": None}, False),
        ({"stream": False}, False),
        ({"stream": True}, True),
        ({"stream": True, "stream_options": {"include_usage": True}}, True),
        ({"stream_options": {}}, False),
        ({"stream_options": None}, False),
    ],
)
def test_stream_accepted(
    parse: Parser, body: Callable[..., dict[str, Any]], fields: dict[str, Any], is_stream: bool
) -> None:
    """stream and stream_options are read as vLLM reads them."""
    assert parse(body(**fields)).is_stream is is_stream


@both_kinds
@pytest.mark.parametrize(
    "fields",
    [
        {"stream_options": {"include_usage": True}},
        {"stream": False, "stream_options": {"include_usage": True}},
    ],
)
def test_stream_options_without_stream(
    parse: Parser, body: Callable[..., dict[str, Any]], fields: dict[str, Any]
) -> None:
    """stream_options without stream is refused with vLLM's message."""
    err = refusal(parse, body(**fields))
    assert (err.param, err.message) == (
        "stream_options",
        "Stream options can only be defined when `stream=True`.",
    )


@both_kinds
@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"model": 5}, "model"),
        ({"model": ["tiny"]}, "model"),
        ({"stream": "perhaps"}, "stream"),
        ({"stream": True, "stream_options": {"include_usage": "perhaps"}}, "stream_options"),
    ],
)
def test_other_declared_fields_refused(
    parse: Parser, body: Callable[..., dict[str, Any]], fields: dict[str, Any], param: str
) -> None:
    """An ill-typed model or stream field is a 400 naming it, with no pydantic link in it."""
    err = refusal(parse, body(**fields))
    assert err.param == param
    assert err.message.startswith(f"Invalid {param}")
    assert "pydantic" not in err.message


@both_kinds
def test_unknown_fields_pass_through(parse: Parser, body: Callable[..., dict[str, Any]]) -> None:
    """Fields the gateway does not read are kept as sent and the body is not modified."""
    sent = body(
        temperature=0.2,
        top_k=-1,
        guided_json={"type": "object"},
        vllm_xargs={"a": [1]},
        max_tokens=5.0,
    )
    before = copy.deepcopy(sent)
    view = parse(sent)
    assert sent == before
    assert view.model_extra is not None
    assert view.model_extra["guided_json"] == {"type": "object"}
    assert view.model_extra["vllm_xargs"] == {"a": [1]}


JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
FIELDS = st.sampled_from(
    [
        "model",
        "messages",
        "prompt",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "best_of",
        "stream",
        "stream_options",
        "prompt_embeds",
        "x",
    ]
)


@settings(max_examples=300, deadline=None)
@given(body=st.dictionaries(FIELDS, JSON_VALUES, max_size=6) | JSON_VALUES)
def test_any_body_is_a_view_or_a_bad_request(body: object) -> None:
    """Whatever JSON arrives, parsing yields a view or a 400 with a message, never another error."""
    for parse in (parse_chat, parse_completion):
        result = outcome(parse, body)
        if isinstance(result, BadRequest):
            assert result.status == 400
            assert result.message
            assert "pydantic" not in result.message
        else:
            assert result.num_prompts >= 1
            requested = result.requested_max_tokens
            assert requested is None or (type(requested) is int and requested >= 1)


def outcome(parse: Parser, body: object) -> ChatView | CompletionView | BadRequest:
    try:
        return parse(body)
    except BadRequest as err:
        return err
