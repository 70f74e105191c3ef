"""What vLLM 0.32 does with a chat request before it tokenizes it: the template chosen, the
keyword arguments merged and checked, the conversation normalised, ready to render
(`PreparedChat`); and the plain chat's bound, made without vLLM's conversation.

Steps 3 to 6 of `engine.tokenization`'s list (the messages normalised by `engine.chat_messages`,
the template compiled and rendered by `engine.chat_template`); `engine.tokenization`'s
`PromptTokenizer` is a `ChatPreparer` with the model's tokenizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from engine import render_bound
from engine.chat_messages import (
    ContentFormat,
    ContentFormatOption,
    InvalidChat,
    UnsupportedLocally,
    check_chat_template_kwargs,
    check_documents,
    developer_to_system,
    merge_kwargs,
    normalize_messages,
    normalize_tools,
    plain_messages,
)
from engine.chat_template import CompiledTemplate, compile_template, render_template

__all__ = ["ChatPreparer", "PreparedChat", "plain_request"]

# Constants taken from vLLM 0.32 and transformers 5 (names of the originals in comments).
_HF_CHAT_PARAMS = frozenset(
    {  # inspect.signature(PythonBackend.apply_chat_template)
        "self",
        "conversation",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)
_REASONING_EFFORTS = frozenset({"none", "minimal", "low", "medium", "high", "xhigh", "max"})
_TEMPLATE_CACHE_SIZE = 32


class ChatPreparer:
    """One model's chat template(s), preparing chat requests as vLLM does."""

    def __init__(
        self,
        special_tokens: Mapping[str, str],
        chat_template: str | dict[str, str] | None,
        default_chat_template: str | None = None,
        default_chat_template_kwargs: Mapping[str, object] | None = None,
        content_format: ContentFormatOption = "auto",
        processor_template_possible: bool = False,
    ) -> None:
        self.special_tokens: Mapping[str, str] = dict(special_tokens)
        self.chat_template = chat_template
        self._default_template = default_chat_template
        self._default_kwargs = dict(default_chat_template_kwargs or {})
        self._content_format: ContentFormatOption = content_format
        self._processor_template_possible = processor_template_possible
        self._compiled: dict[str, CompiledTemplate] = {}
        self._plain_setups: dict[tuple[bool, bool], _ChatSetup] = {}
        """The setup of a chat with no tools, documents, template or template arguments of its
        own, by (add_generation_prompt, continue_final_message): the same for every one."""
        self._plain_bounds: dict[tuple[bool, bool], _PlainBound | Literal[False]] = {}
        """What `plain_chat_bound` reads of each plain setup, made at its first use: False
        when such a chat has no bound without its conversation."""

    def _compiled_template(self, source: str) -> CompiledTemplate:
        compiled = self._compiled.get(source)
        if compiled is None:
            if len(self._compiled) >= _TEMPLATE_CACHE_SIZE:
                self._compiled.clear()
            compiled = self._compiled[source] = compile_template(source)
        return compiled

    def _resolve_template(self, requested: str | None, tools: object) -> str:
        """`resolve_chat_template` (vllm/renderers/hf.py) with transformers' get_chat_template."""
        own = self.chat_template
        if requested is not None:
            if isinstance(own, dict) and requested in own:
                return own[requested]
            return requested
        if tools is None and self._processor_template_possible:
            raise UnsupportedLocally("the model may have a processor chat template")
        if isinstance(own, dict):
            if tools is not None and "tool_use" in own:
                return own["tool_use"]
            if "default" in own:
                return own["default"]
        elif own is not None:
            return own
        raise UnsupportedLocally("the tokenizer has no usable chat template")

    def render_chat(
        self,
        messages: object,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: object = None,
        chat_template: str | None = None,
        chat_template_kwargs: Mapping[str, object] | None = None,
        documents: object = None,
        reasoning_effort: str | None = None,
    ) -> str:
        """The prompt text vLLM renders for a chat request with these fields."""
        return self.prepare_chat(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            chat_template=chat_template,
            chat_template_kwargs=chat_template_kwargs,
            documents=documents,
            reasoning_effort=reasoning_effort,
        ).render()

    def prepare_chat(
        self,
        messages: object,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: object = None,
        chat_template: str | None = None,
        chat_template_kwargs: Mapping[str, object] | None = None,
        documents: object = None,
        reasoning_effort: str | None = None,
    ) -> PreparedChat:
        """Everything vLLM does with a chat request before it renders the template (checks
        included: InvalidChat and UnsupportedLocally are raised here), ready to render."""
        if add_generation_prompt and continue_final_message:
            raise InvalidChat(
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
            )
        if chat_template is not None and not isinstance(chat_template, str):
            raise InvalidChat("chat_template must be a string", "chat_template")
        if reasoning_effort is not None and reasoning_effort not in _REASONING_EFFORTS:
            raise InvalidChat(
                f"reasoning_effort must be one of {sorted(_REASONING_EFFORTS)}", "reasoning_effort"
            )
        plain = plain_request(
            tools, documents, chat_template, chat_template_kwargs, reasoning_effort
        )
        flags = (add_generation_prompt, continue_final_message)
        setup = self._plain_setups.get(flags) if plain else None
        if setup is None:
            setup = self._setup(
                add_generation_prompt,
                continue_final_message,
                tools,
                chat_template,
                chat_template_kwargs,
                documents,
                reasoning_effort,
            )
            if plain:  # the same for every such request of this tokenizer: made once
                self._plain_setups[flags] = setup
        source, compiled = setup.source, setup.compiled
        conversation = normalize_messages(messages, setup.content_format)
        if (
            any(m["role"] == "developer" for m in conversation)
            and '"developer"' not in source
            and "'developer'" not in source
        ):
            conversation = developer_to_system(conversation)
        if compiled.template is None:  # vLLM fails outside its 400 handling here
            raise UnsupportedLocally(f"the chat template does not parse: {compiled.error}")
        if not conversation:
            raise InvalidChat(
                "Cannot apply chat template to an empty conversation. Provide at least one message."
            )
        return PreparedChat(
            compiled,
            source,
            setup.content_format,
            conversation,
            setup.tools,
            setup.documents,
            setup.add_generation_prompt,
            setup.continue_final_message,
            dict(setup.variables),  # the template may write into its variables
        )

    def plain_chat_bound(self, messages: object, add_generation_prompt: bool) -> int | None:
        """`prepare_chat(messages, add_generation_prompt=...).length_bound()` of a plain chat
        (no tools, documents, template, template arguments or reasoning effort of its own, the
        final message not continued) whose messages are `chat_messages.plain_messages`: the
        same number, without making vLLM's conversation; prepare_chat's checks all pass for
        such a chat. None for any other chat, and until a plain chat with these flags made
        the setup: the caller then prepares it."""
        flags = (add_generation_prompt, False)
        plain = self._plain_bounds.get(flags)
        if plain is None:
            setup = self._plain_setups.get(flags)
            if setup is None:
                return None
            plain = self._plain_bounds[flags] = _plain_bound(setup)
        if plain is False or not plain_messages(messages):
            return None
        bound, sums, parts = plain
        return bound.of_plain(
            messages,  # type: ignore[arg-type]  # plain_messages checked their shape
            sums,
            parts=parts,
        )

    def _setup(
        self,
        add_generation_prompt: bool,
        continue_final_message: bool,
        tools: object,
        chat_template: str | None,
        chat_template_kwargs: Mapping[str, object] | None,
        documents: object,
        reasoning_effort: str | None,
    ) -> _ChatSetup:
        """What a chat request's parameters make of the template and its variables (all but
        the messages)."""
        check_documents(documents, strict=True)
        tool_dicts = normalize_tools(tools) if tools is not None else None
        user_kwargs = check_chat_template_kwargs(chat_template_kwargs)

        # ChatCompletionRequest.build_chat_params(...).with_defaults(...)
        extra: dict[str, object] = {
            "add_generation_prompt": add_generation_prompt,
            "continue_final_message": continue_final_message,
            "documents": documents,
            "reasoning_effort": reasoning_effort,
        }
        if reasoning_effort is not None and "enable_thinking" not in user_kwargs:
            extra["enable_thinking"] = reasoning_effort != "none"
        request_kwargs = merge_kwargs(user_kwargs, extra)
        defaults = merge_kwargs(self._default_kwargs, {"tools": tool_dicts, "tokenize": False})
        kwargs = merge_kwargs(defaults, request_kwargs)
        final_tools = kwargs.pop("tools", None)
        kwargs.pop("tokenize", None)
        check_documents(kwargs.get("documents"), strict=False)

        source = self._resolve_template(chat_template or self._default_template, final_tools)
        compiled = self._compiled_template(source)
        content_format: ContentFormat = (
            compiled.content_format if self._content_format == "auto" else self._content_format
        )
        # resolve_chat_template_kwargs keeps the template's variables and transformers'
        # parameters; apply_chat_template consumes its parameters and passes the rest, over the
        # special tokens, to the template.
        variables: dict[str, object] = {
            **self.special_tokens,
            **{
                k: v
                for k, v in kwargs.items()
                if k in compiled.variables and k not in _HF_CHAT_PARAMS
            },
        }
        return _ChatSetup(
            compiled,
            source,
            content_format,
            final_tools,
            kwargs.get("documents"),
            bool(kwargs.get("add_generation_prompt", False)),
            bool(kwargs.get("continue_final_message", False)),
            variables,
        )


def plain_request(
    tools: object,
    documents: object,
    chat_template: str | None,
    chat_template_kwargs: Mapping[str, object] | None,
    reasoning_effort: str | None,
) -> bool:
    """Whether a chat request brings no tools, documents, template, template arguments or
    reasoning effort of its own: its setup is then its tokenizer's plain one (made once)."""
    return (
        tools is None
        and documents is None
        and chat_template is None
        and not chat_template_kwargs
        and reasoning_effort is None
    )


_PlainBound = tuple[render_bound.LengthBound, tuple[int, int, int, int, int], bool]
"""A plain setup's length bound, its sums for the setup's variables, and whether contents are
seen as text parts."""


def _plain_bound(setup: _ChatSetup) -> _PlainBound | Literal[False]:
    """What bounds a plain chat of this setup from its messages alone, or False when nothing
    does (tools or documents by default, no bound for the template, a template that does not
    parse, a named token that is not a string)."""
    bound = setup.compiled.length_bounds.get(setup.content_format)
    if (
        bound is None
        or setup.tools is not None
        or setup.documents is not None
        or setup.compiled.template is None
    ):
        return False
    try:
        sums = bound.sums(setup.variables)
    except TypeError:
        return False
    return bound, sums, setup.content_format == "openai"


@dataclass(frozen=True, slots=True)
class _ChatSetup:
    """What `PromptTokenizer._setup` makes of a chat request's parameters."""

    compiled: CompiledTemplate
    source: str
    content_format: ContentFormat
    tools: object
    documents: object
    add_generation_prompt: bool
    continue_final_message: bool
    variables: dict[str, object]


@dataclass(frozen=True, slots=True)
class PreparedChat:
    """A chat request as the template will see it (`PromptTokenizer.prepare_chat`)."""

    compiled: CompiledTemplate
    source: str
    content_format: ContentFormat
    conversation: list[dict[str, Any]]
    tools: object
    documents: object
    add_generation_prompt: bool
    continue_final_message: bool
    variables: dict[str, object]

    def render(self) -> str:
        assert self.compiled.template is not None  # prepare_chat raised otherwise
        return render_template(
            self.compiled.template,
            self.source,
            self.conversation,
            self.tools,
            self.documents,
            self.add_generation_prompt,
            self.continue_final_message,
            self.variables,
        )

    def length_bound(self) -> int | None:
        """UTF-8 bytes the rendered prompt certainly does not exceed, without rendering it;
        None when the template or the request is outside what `engine.render_bound` proves."""
        bound = self.compiled.length_bounds.get(self.content_format)
        if bound is None or not render_bound.applies(
            self.conversation, self.tools, self.documents, self.continue_final_message
        ):
            return None
        try:
            return bound.of(self.conversation, self.variables)
        except TypeError:  # a named token that is not a string
            return None
