"""Exact prompt token counts, computed the way vLLM 0.32 computes them, without vLLM.

Reads a model's `tokenizer.json` with the Rust `tokenizers` library and renders its chat template
with Jinja2 in the environment transformers uses. No torch, no transformers.

What vLLM does with a chat request, and where this package reproduces it (vLLM 0.32,
transformers 5):

1. Messages, tools and kwargs are normalised as vLLM's request models and `chat_utils` leave
   them (`engine.chat_messages`).
2. The template's content format ("string" or "openai") is detected from its AST
   (`engine.chat_template`).
3. The template is chosen (`resolve_chat_template`, `engine.chat_prepare`): the request's
   `chat_template` (or the name of one of the tokenizer's templates), else the server's
   `--chat-template`, else an AutoProcessor template, else the tokenizer's (`tool_use` when
   tools are given and the tokenizer has a dict of templates, else `default`).
4. A `developer` message becomes `system` when the template never mentions that role
   (`engine.chat_messages`).
5. Keyword arguments (`engine.chat_prepare`): the request's `chat_template_kwargs`, overridden
   by the request fields `add_generation_prompt`, `continue_final_message`, `documents`,
   `reasoning_effort` (and `enable_thinking` derived from it), over the server's defaults;
   values None and "auto" are dropped. Only names the template uses (or transformers' own
   parameters) are passed on.
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
from pathlib import Path
from typing import Any, Self

from tokenizers import AddedToken, Tokenizer

from engine.chat_messages import (
    ContentFormatOption,
    InvalidChat,
    UnsupportedLocally,
    local_chat_supported,
)
from engine.chat_prepare import ChatPreparer

__all__ = [
    "InvalidChat",
    "PromptTokenizer",
    "UnsupportedLocally",
    "completion_prompts",
    "local_chat_supported",
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
# Files that make vLLM try an AutoProcessor chat template before the tokenizer's.
_PROCESSOR_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "chat_template.json",
    "video_preprocessor_config.json",
)
# Tokenizer classes whose encoding is tokenizer.json alone; others rebuild parts of it in code.
_GENERIC_TOKENIZER_CLASSES = frozenset({"PreTrainedTokenizerFast", "TokenizersBackend"})


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


class PromptTokenizer(ChatPreparer):
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
        chat = (special_tokens, chat_template, default_chat_template, default_chat_template_kwargs)
        super().__init__(*chat, content_format, processor_template_possible)
        self._tok = tokenizer
        self._clean_up = clean_up_tokenization_spaces
        self.inexact_reason = inexact_reason
        """Why encodings may differ from transformers' (a model-specific tokenizer class that
        rebuilds parts of tokenizer.json in code), or None."""
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
        # encode_batch_fast, unlike encode, releases the GIL while it works: a long prompt
        # counted in a worker thread then leaves the event loop running. Without the offsets
        # (the ids are the same) a 30,000-token prompt takes about a third less time and memory.
        batch = self._tok.encode_batch_fast([prompt], add_special_tokens=add_special_tokens)
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
