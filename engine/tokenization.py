"""Exact prompt token counts, computed the way vLLM 0.32 computes them, without vLLM.

Reads a model's `tokenizer.json` with the Rust `tokenizers` library and renders its chat template
with Jinja2 in the environment transformers uses. No torch, no transformers.

What vLLM does with a chat request, and where this package reproduces it (vLLM 0.32,
transformers 5):

1. Messages, tools and kwargs are normalised as vLLM's request models and `chat_utils` leave
   them (`engine.chat_messages`).
2. The template's content format ("string" or "openai") is detected from its AST
   (`engine.chat_template`).
3. The template is chosen (`resolve_chat_template`, here): the request's `chat_template` (or
   the name of one of the tokenizer's templates), else the server's `--chat-template`, else an
   AutoProcessor template, else the tokenizer's (`tool_use` when tools are given and the
   tokenizer has a dict of templates, else `default`).
4. A `developer` message becomes `system` when the template never mentions that role
   (`engine.chat_messages`).
5. Keyword arguments (here): the request's `chat_template_kwargs`, overridden by the request
   fields `add_generation_prompt`, `continue_final_message`, `documents`, `reasoning_effort`
   (and `enable_thinking` derived from it), over the server's defaults; values None and "auto"
   are dropped. Only names the template uses (or transformers' own parameters) are passed on.
6. The template is rendered in transformers' sandboxed Jinja environment
   (`engine.chat_template`).
7. The rendered text is tokenized like a completion prompt (here), with `add_special_tokens`
   false by default for chat (the request field changes it) and true by default for
   completions.

What this package cannot reproduce raises `UnsupportedLocally`; the caller then asks the
engine's `/tokenize`. A request vLLM would reject raises `InvalidChat` (HTTP 400 there, too).
Both, and `local_chat_supported`, are importable from here as well.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

from tokenizers import AddedToken, Tokenizer

from engine import render_bound
from engine.chat_messages import (
    ContentFormat,
    ContentFormatOption,
    InvalidChat,
    UnsupportedLocally,
    check_chat_template_kwargs,
    check_documents,
    developer_to_system,
    local_chat_supported,
    merge_kwargs,
    normalize_messages,
    normalize_tools,
    plain_messages,
)
from engine.chat_template import CompiledTemplate, compile_template, render_template

__all__ = [
    "InvalidChat",
    "PreparedChat",
    "PromptTokenizer",
    "UnsupportedLocally",
    "completion_prompts",
    "local_chat_supported",
    "plain_request",
]

# Constants taken from vLLM 0.32 and transformers 5 (names of the originals in comments).
_STANDARD_SPECIAL_TOKENS = (  # PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
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
# Files that make vLLM try an AutoProcessor chat template before the tokenizer's.
_PROCESSOR_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "chat_template.json",
    "video_preprocessor_config.json",
)
# Tokenizer classes whose encoding is tokenizer.json alone; others rebuild parts of it in code.
_GENERIC_TOKENIZER_CLASSES = frozenset({"PreTrainedTokenizerFast", "TokenizersBackend"})
_TEMPLATE_CACHE_SIZE = 32


def _token_content(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _clean_up_spaces(text: str) -> str:  # transformers clean_up_tokenization
    for old, new in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(old, new)
    return text


class PromptTokenizer:
    """One model's tokenizer and chat template(s), counting prompts as vLLM does."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        special_tokens: Mapping[str, str],
        chat_template: str | dict[str, str] | None,
        default_chat_template: str | None = None,
        default_chat_template_kwargs: Mapping[str, object] | None = None,
        content_format: ContentFormatOption = "auto",
        clean_up_tokenization_spaces: bool = False,
        processor_template_possible: bool = False,
        inexact_reason: str | None = None,
    ) -> None:
        self._tok = tokenizer
        self.special_tokens: Mapping[str, str] = dict(special_tokens)
        self.chat_template = chat_template
        self._default_template = default_chat_template
        self._default_kwargs = dict(default_chat_template_kwargs or {})
        self._content_format: ContentFormatOption = content_format
        self._clean_up = clean_up_tokenization_spaces
        self._processor_template_possible = processor_template_possible
        self.inexact_reason = inexact_reason
        """Why encodings may differ from transformers' (a model-specific tokenizer class that
        rebuilds parts of tokenizer.json in code), or None."""
        self._compiled: dict[str, CompiledTemplate] = {}
        self._plain_setups: dict[tuple[bool, bool], _ChatSetup] = {}
        """The setup of a chat with no tools, documents, template or template arguments of its
        own, by (add_generation_prompt, continue_final_message): the same for every one."""
        self._plain_bounds: dict[tuple[bool, bool], _PlainBound | Literal[False]] = {}
        """What `plain_chat_bound` reads of each plain setup, made at its first use: False
        when such a chat has no bound without its conversation."""
        post = tokenizer.post_processor
        self._special_margin = int(post.num_special_tokens_to_add(False)) if post else 0
        self._bound_factor, self._bound_normalize = self._bound_shape(tokenizer)
        self._longest_token_bytes: int | None = None  # for lower_bound, made on first use

    @property
    def exact(self) -> bool:
        return self.inexact_reason is None

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        *,
        chat_template: str | None = None,
        chat_template_kwargs: Mapping[str, object] | None = None,
        content_format: ContentFormatOption = "auto",
    ) -> Self:
        """Load `tokenizer.json`, `tokenizer_config.json` (and `chat_template.jinja`,
        `additional_chat_templates/*.jinja`, `special_tokens_map.json`) the way
        `AutoTokenizer.from_pretrained` does. `chat_template` and `chat_template_kwargs` are the
        server's `--chat-template` (the text) and `--default-chat-template-kwargs`.
        Raises OSError or ValueError when the files are missing or unreadable."""
        folder = Path(path)
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tok.no_truncation()  # vLLM's calls set truncation themselves, never the file's
        tok.no_padding()
        config = _read_json(folder / "tokenizer_config.json")
        legacy_map = _read_json(folder / "special_tokens_map.json")

        # The template variables `bos_token`, `eos_token`, ...: the standard names, then other
        # `*_token` strings of the config (transformers' model-specific special tokens). An old
        # special_tokens_map.json overrides the config when the config lists no added tokens.
        specials: dict[str, str] = {}
        for name in _STANDARD_SPECIAL_TOKENS:
            value = _token_content(config.get(name))
            if "added_tokens_decoder" not in config and name in legacy_map:
                value = _token_content(legacy_map[name])
            if value is not None:
                specials[name] = value
        specials.update(
            (k, v)
            for k, v in config.items()
            if k.endswith("_token")
            and k not in specials
            and isinstance(v, str)
            and k not in _STANDARD_SPECIAL_TOKENS
        )
        extra = config.get("extra_special_tokens")
        if isinstance(extra, dict):
            specials.update(
                (k, v) for k, v in extra.items() if isinstance(k, str) and isinstance(v, str)
            )

        # transformers adds tokens named in the config that tokenizer.json does not have.
        present = {str(t.content) for t in tok.get_added_tokens_decoder().values()}
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            for spec in decoder.values():
                if (
                    isinstance(spec, dict)
                    and isinstance(spec.get("content"), str)
                    and spec["content"] not in present
                ):
                    fields = {
                        k: spec[k]
                        for k in ("single_word", "lstrip", "rstrip", "normalized", "special")
                        if k in spec
                    }
                    tok.add_tokens([AddedToken(spec["content"], **fields)])
                    present.add(spec["content"])
        missing = [v for v in specials.values() if v not in present]
        extra_list = config.get("extra_special_tokens") or config.get("additional_special_tokens")
        if isinstance(extra_list, list):
            missing += [v for v in map(_token_content, extra_list) if v and v not in present]
        if missing:
            tok.add_special_tokens([AddedToken(v, special=True) for v in dict.fromkeys(missing)])
        if config.get("split_special_tokens") is True:
            tok.encode_special_tokens = True

        inexact = None
        tokenizer_class = config.get("tokenizer_class")
        if "auto_map" in config:
            inexact = "the tokenizer is custom code (auto_map)"
        elif tokenizer_class not in _GENERIC_TOKENIZER_CLASSES:
            inexact = (
                f"tokenizer_class {tokenizer_class!r} may rebuild its pipeline in "
                "transformers instead of using tokenizer.json as is"
            )

        return cls(
            tok,
            special_tokens=specials,
            chat_template=cls._read_templates(folder, config),
            default_chat_template=chat_template,
            default_chat_template_kwargs=chat_template_kwargs,
            content_format=content_format,
            clean_up_tokenization_spaces=config.get("clean_up_tokenization_spaces") is True,
            processor_template_possible=any((folder / f).is_file() for f in _PROCESSOR_FILES),
            inexact_reason=inexact,
        )

    @staticmethod
    def _read_templates(folder: Path, config: Mapping[str, Any]) -> str | dict[str, str] | None:
        files: dict[str, str] = {}
        if (folder / "chat_template.jinja").is_file():
            files["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        extra_dir = folder / "additional_chat_templates"
        if extra_dir.is_dir():
            for file in sorted(extra_dir.glob("*.jinja")):
                files[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
        if files:  # template files take priority over tokenizer_config.json
            return files["default"] if list(files) == ["default"] else files
        template = config.get("chat_template")
        if isinstance(template, list):
            return {str(t["name"]): str(t["template"]) for t in template}
        return template if isinstance(template, str) else None

    # -- completions ---------------------------------------------------------------------------

    def encode_completion(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        """`tokenizer(prompt, add_special_tokens=...)`, as vLLM tokenizes a text prompt."""
        # encode_batch, unlike encode, releases the GIL while it works: a long prompt counted in
        # a worker thread then leaves the event loop running. Same ids, same speed.
        batch = self._tok.encode_batch([prompt], add_special_tokens=add_special_tokens)
        return list(batch[0].ids)

    def decode(self, ids: list[int]) -> str:
        text = str(self._tok.decode(ids, skip_special_tokens=False))
        return _clean_up_spaces(text) if self._clean_up else text

    def upper_bound(self, text: str) -> int:
        """A cheap count that is never below `len(encode_completion(text, True))`.

        Why it is a bound: a byte-level BPE maps each UTF-8 byte to one symbol and merges only
        join symbols, so each token covers at least one byte; an added (special) token matched
        in the text covers at least one byte too. The tokens of a byte-level tokenizer without
        a normalizer or prefix space are therefore at most the UTF-8 length, plus what the
        post-processor adds (BOS). Any other tokenizer is bounded after its normalizer (which
        may lengthen text) by twice the UTF-8 length plus one: byte fallback spends at most one
        token per byte, and a prefix marker (Metaspace, add_prefix_space) is added at most
        once per section of text between added tokens, each of which is at least one byte.
        Counting bytes is linear and far cheaper than BPE.
        """
        if self._bound_normalize and self._tok.normalizer is not None:
            text = str(self._tok.normalizer.normalize_str(text))
        extra = 1 if self._bound_factor > 1 else 0
        return self._bound_factor * len(text.encode("utf-8")) + extra + self._special_margin

    def lower_bound(self, text: str) -> int | None:
        """A cheap count that is never above `len(encode_completion(text, ...))`, or None
        when this tokenizer has none.

        For a plain byte-level BPE (no normalizer, no prefix space), each token covers the
        UTF-8 bytes of one vocabulary entry (a byte-level entry is one byte per character)
        or of an added token matched in the text, so there are at least bytes / L tokens, L
        the longest such entry in bytes: computed once per tokenizer. Other tokenizers can
        lengthen the text before it is split, and get no lower bound."""
        if self._bound_factor != 1:
            return None
        if self._longest_token_bytes is None:
            vocab = self._tok.get_vocab(with_added_tokens=False)
            added = self._tok.get_added_tokens_decoder().values()
            self._longest_token_bytes = max(
                max((len(t) for t in vocab), default=1),
                max((len(a.content.encode("utf-8")) for a in added), default=1),
            )
        size = len(text) if text.isascii() else len(text.encode("utf-8"))
        return -(-size // self._longest_token_bytes)

    @staticmethod
    def _bound_shape(tok: Any) -> tuple[int, bool]:
        """(factor, normalize) for upper_bound: (1, False) for a plain byte-level BPE."""
        if tok.normalizer is not None or tok.pre_tokenizer is None:
            return 2, True
        pre = json.loads(tok.pre_tokenizer.__getstate__())  # this component's JSON only
        pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
        byte_level = [p for p in pres if p.get("type") == "ByteLevel"]
        plain = len(byte_level) == 1 and not byte_level[0].get("add_prefix_space", False)
        return (1, False) if plain else (2, True)

    # -- chat ----------------------------------------------------------------------------------

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

    def tokens_bound(self, nbytes: int) -> int | None:
        """`upper_bound` of any text of at most `nbytes` UTF-8 bytes, when the tokenizer has no
        normalizer (which could lengthen the text); else None."""
        if self._bound_normalize and self._tok.normalizer is not None:
            return None
        extra = 1 if self._bound_factor > 1 else 0
        return self._bound_factor * nbytes + extra + self._special_margin

    def encode_chat(
        self,
        messages: object,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: object = None,
        chat_template: str | None = None,
        chat_template_kwargs: Mapping[str, object] | None = None,
        add_special_tokens: bool = False,
        documents: object = None,
        reasoning_effort: str | None = None,
    ) -> list[int]:
        """The prompt token ids vLLM makes of a chat request (before any truncation)."""
        text = self.render_chat(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            chat_template=chat_template,
            chat_template_kwargs=chat_template_kwargs,
            documents=documents,
            reasoning_effort=reasoning_effort,
        )
        return self.encode_completion(text, add_special_tokens=add_special_tokens)


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


def completion_prompts(prompt: object) -> Sequence[str | list[int]]:
    """A completion request's `prompt` as vLLM splits it (`prompt_to_seq`): one string, a list
    of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise InvalidChat(
            "prompt must be a string, a list of strings, a list of token ids or "
            "a list of token-id lists, and not empty",
            "prompt",
        )
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        ids: list[int] = prompt
        _check_ids(ids)
        return [ids]
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if all(isinstance(p, list) for p in prompt):
        for ids in prompt:
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise InvalidChat("token-id prompts must hold integers only", "prompt")
            _check_ids(ids)
        return list(prompt)
    raise InvalidChat("prompt mixes strings, token ids and lists", "prompt")


def _check_ids(ids: list[int]) -> None:
    if any(t < 0 for t in ids):
        raise InvalidChat("token ids must not be negative", "prompt")
