"""Request views: the few fields of a chat or completion request that admission reads.

A view is validated from the client's parsed JSON body and never serialised back: the gateway
forwards the client's own dict, rewritten only by `policy.Admit.rewrite`, so the many fields vLLM
knows and the gateway does not pass through untouched (`extra="allow"`, nothing declared for them).

Strict where admission decides. pydantic's lax mode would read `true` as 1 and `"5"` as 5; here
`max_tokens`, `max_completion_tokens`, `n` and `best_of` accept an integer or an integral float
(`5.0`, which vLLM accepts too) and nothing else. Fields the gateway only passes on (`stream`,
`stream_options`) keep vLLM's own lax reading, so the gateway and the engine read them alike.

Lean on the hot path: messages are checked for shape (a non-empty list of objects with a string
`role`) and returned as they came, not copied; a token-id prompt is checked by its structure and
first id only, since admission needs only its length and the engine validates every id itself.

`parse_chat` and `parse_completion` turn any validation failure into `errors.BadRequest` with a
message a person can act on and the offending parameter in `param`, never a pydantic dump.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from gateway.errors import BadRequest

Prompt = str | list[str] | list[int] | list[list[int]]
"""A completions prompt, as vLLM accepts it: text, texts, token ids, or lists of token ids."""

_GUARD_ERROR = "vllm_guard"
"""pydantic error type of the messages written here; its msg is already the client's message."""

_PROMPT_SHAPES = "a string, a list of strings, a list of token ids, or a list of token-id lists"

# vLLM 0.32, CompletionRequest.validate_prompt_and_prompt_embeds
# (vllm/entrypoints/openai/completion/protocol.py).
_NO_PROMPT = "Either prompt or prompt_embeds must be provided and non-empty."

_MISSING = {
    "messages": "messages is required: a non-empty list of message objects, each with a 'role'.",
    "prompt": _NO_PROMPT,
}


def _fail(message: str) -> PydanticCustomError:
    # The message goes in as context, not as the template: client text may hold braces.
    return PydanticCustomError(_GUARD_ERROR, "{message}", {"message": message})


def _describe(value: object) -> str:
    """A short, bounded rendering of a client value for an error message, in JSON terms."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        text = repr(value)
        return text if len(text) <= 40 else text[:40] + "..."
    if isinstance(value, str):
        return f"a string ({value[:30]!r}{'...' if len(value) > 30 else ''})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _count(value: object, name: str) -> int | None:
    """A positive integer parameter: null is absent; 5.0 is 5; true, "5", 5.5, 0, -1 fail."""
    if value is None:
        return None
    if type(value) is int:
        number = value
    elif type(value) is float and value.is_integer():
        number = int(value)
    else:
        raise _fail(f"{name} must be an integer, got {_describe(value)}.")
    if number < 1:
        if name in ("n", "best_of"):
            # vLLM 0.32, _verify_num_sequences (vllm/sampling_params.py).
            raise _fail(f"{name} must be at least 1, got {number}.")
        # vLLM 0.32, SamplingParams._verify_args (vllm/sampling_params.py), rendered by
        # VLLMValidationError.__str__ (vllm/exceptions.py) with its parameter and value.
        raise _fail(f"{name} must be at least 1, got {number}. (parameter={name}, value={number})")
    return number


class StreamOptionsView(BaseModel):
    """`stream_options`, read the way vLLM reads it (lax booleans)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class _GenerationView(BaseModel):
    """Fields common to chat and completion requests."""

    model_config = ConfigDict(extra="allow", frozen=True)

    model: str | None = None
    max_tokens: int | None = None
    n: int | None = None
    best_of: int | None = None
    stream: bool | None = None
    stream_options: StreamOptionsView | None = None

    @field_validator("max_tokens", "n", "best_of", mode="plain")
    @classmethod
    def _positive_int(cls, value: object, info: ValidationInfo) -> int | None:
        return _count(value, info.field_name or "value")

    @property
    def requested_max_tokens(self) -> int | None:
        """The output limit the client asked for, or None when it sent none."""
        return self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        """The name of the parameter `requested_max_tokens` came from."""
        return "max_tokens"

    @property
    def sent_max_completion_tokens(self) -> bool:
        return False

    @property
    def num_prompts(self) -> int:
        return 1

    @property
    def is_stream(self) -> bool:
        return bool(self.stream)


class ChatView(_GenerationView):
    """A `/v1/chat/completions` request."""

    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None

    @field_validator("max_completion_tokens", mode="plain")
    @classmethod
    def _positive_int_mct(cls, value: object) -> int | None:
        return _count(value, "max_completion_tokens")

    @field_validator("messages", mode="plain")
    @classmethod
    def _check_messages(cls, value: object) -> list[dict[str, Any]]:
        if not isinstance(value, list):
            raise _fail(f"messages must be a list of message objects, got {_describe(value)}.")
        if not value:
            raise _fail("messages must not be empty: send at least one message.")
        for index, message in enumerate(value):
            if not isinstance(message, dict):
                raise _fail(
                    f"messages[{index}] must be an object with a 'role', got {_describe(message)}."
                )
            role = message.get("role")
            if not isinstance(role, str):
                if "role" not in message:
                    raise _fail(f"messages[{index}] has no 'role'.")
                raise _fail(f"messages[{index}].role must be a string, got {_describe(role)}.")
        return value

    @property
    def requested_max_tokens(self) -> int | None:
        """vLLM's rule for chat: `max_completion_tokens` when present, else `max_tokens`."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        if self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return "max_tokens"

    @property
    def sent_max_completion_tokens(self) -> bool:
        return self.max_completion_tokens is not None


class CompletionView(_GenerationView):
    """A `/v1/completions` request."""

    # Declared before `prompt`: errors are reported in field order, and a request that carries
    # embeddings must hear about them, not about a missing prompt.
    prompt_embeds: None = None
    prompt: Prompt

    @field_validator("prompt_embeds", mode="plain")
    @classmethod
    def _no_prompt_embeds(cls, value: object) -> None:
        if value is not None:
            raise _fail(
                "prompt_embeds is not supported through this gateway: the length of an "
                "embedded prompt cannot be checked. Send prompt as text or token ids."
            )

    @field_validator("prompt", mode="plain")
    @classmethod
    def _check_prompt(cls, value: object) -> Prompt:
        if isinstance(value, str):
            if not value:
                raise _fail(_NO_PROMPT)
            return value
        if value is None or (isinstance(value, list) and not value):
            raise _fail(_NO_PROMPT)
        if not isinstance(value, list):
            raise _fail(f"prompt must be {_PROMPT_SHAPES}, got {_describe(value)}.")
        first = value[0]
        if isinstance(first, str):
            return _check_texts(value)
        if isinstance(first, list):
            return _check_token_id_lists(value)
        if _is_token_id(first):
            # The other ids are the engine's to check: admission reads only the length.
            return cast(list[int], value)
        raise _fail(
            f"prompt must be {_PROMPT_SHAPES}, got a list starting with {_describe(first)}."
        )

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts one by one: each a text or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not isinstance(prompt[0], list | str):
            return [prompt]
        return prompt

    @property
    def num_prompts(self) -> int:
        prompt = self.prompt
        if isinstance(prompt, str) or not isinstance(prompt[0], list | str):
            return 1
        return len(prompt)


RequestView = ChatView | CompletionView


def _is_token_id(value: object) -> bool:
    return type(value) is int and value >= 0


def _as_object(body: object) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest(f"The request body must be a JSON object, got {_describe(body)}.")
    # vLLM 0.32, validate_stream_options (chat_completion/protocol.py, completion/protocol.py):
    # the same truthiness test on the raw values.
    if body.get("stream_options") and not body.get("stream"):
        raise BadRequest(
            "Stream options can only be defined when `stream=True`.", param="stream_options"
        )
    return body


def _bad_request(err: ValidationError) -> BadRequest:
    first = err.errors(include_url=False, include_input=False, include_context=False)[0]
    loc = first["loc"]
    param = str(loc[0]) if loc else None
    if first["type"] == _GUARD_ERROR:
        message = first["msg"]
    elif first["type"] == "missing" and param is not None and len(loc) == 1:
        message = _MISSING.get(param, f"{param} is required.")
    else:
        path = ".".join(str(part) for part in loc) or "request"
        message = f"Invalid {path}: {first['msg']}."
    return BadRequest(message, param=param)


def parse_chat(body: object) -> ChatView:
    """The view of a chat request body, or `BadRequest` naming what is wrong and where."""
    data = _as_object(body)
    try:
        return ChatView.model_validate(data)
    except ValidationError as err:
        raise _bad_request(err) from None


def parse_completion(body: object) -> CompletionView:
    """The view of a completion request body, or `BadRequest` naming what is wrong and where."""
    data = _as_object(body)
    try:
        return CompletionView.model_validate(data)
    except ValidationError as err:
        raise _bad_request(err) from None


def _check_texts(value: list[object]) -> list[str]:
    """A list of prompts that starts with a text: every item must be one."""
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise _fail(f"prompt[{index}] must be a string like prompt[0], got {_describe(item)}.")
    return cast(list[str], value)


def _check_token_id_lists(value: list[object]) -> list[list[int]]:
    """A list of prompts that starts with a list: every item must be a list of token ids (the
    first id is checked; the others are the engine's to check)."""
    for index, item in enumerate(value):
        if not isinstance(item, list) or (item and not _is_token_id(item[0])):
            raise _fail(
                f"prompt[{index}] must be a list of token ids (integers >= 0), "
                f"got {_describe(item)}."
            )
    return cast(list[list[int]], value)
