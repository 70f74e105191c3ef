"""Exact prompt token counts, computed the way vLLM 0.32 computes them, without vLLM.

Reads a model's `tokenizer.json` with the Rust `tokenizers` library and renders its chat template
with Jinja2 in the environment transformers uses. No torch, no transformers.

What vLLM does with a chat request, and what this module reproduces (vLLM 0.32, transformers 5):

1. Messages are normalised (`vllm/renderers/chat_utils.py`, `_parse_chat_message_content`,
   `_postprocess_messages`): a string content becomes one text part; text parts (`text`,
   `input_text`, `output_text`, `refusal`, `thinking`, plain strings) are joined with "\\n"
   into a string when the template's *content format* is "string", or kept as
   `{"type": "text", "text": ...}` dicts (plus unknown extra keys) when it is "openai". Only
   `role`, `content`, `tool_calls`/`reasoning`/`reasoning_content` (assistant), `tool_call_id`
   (tool, whose content is always joined into a string), `name`, `task` and `tools` (developer)
   survive. Tool-call arguments given as JSON text become dicts (`{}` when not an object).
2. The content format is detected from the template's AST (`vllm/renderers/hf.py`,
   `_detect_content_format`): "openai" when the template loops over `message['content']`.
3. The template is chosen (`resolve_chat_template`): the request's `chat_template` (or the name
   of one of the tokenizer's templates), else the server's `--chat-template`, else an
   AutoProcessor template, else the tokenizer's (`tool_use` when tools are given and the
   tokenizer has a dict of templates, else `default`).
4. A `developer` message is turned into `system` (and system messages merged first) when the
   template never mentions the developer role.
5. Keyword arguments: the request's `chat_template_kwargs`, overridden by the request fields
   `add_generation_prompt`, `continue_final_message`, `documents`, `reasoning_effort` (and
   `enable_thinking` derived from it), over the server's defaults; values None and "auto" are
   dropped. Only names the template uses (or transformers' own parameters) are passed on.
6. transformers renders with an `ImmutableSandboxedEnvironment(trim_blocks=True,
   lstrip_blocks=True)`, the `loopcontrols` extension and a `{% generation %}` tag, its own
   `tojson` filter (`ensure_ascii=False`, `indent`, `separators`, `sort_keys`), and the globals
   `raise_exception` and `strftime_now`; the variables are `messages`, `tools`, `documents`,
   `add_generation_prompt`, the named special tokens (`bos_token`, `eos_token`, ...) and the
   kwargs. `continue_final_message` appends a marker to the final message's (last) text, renders,
   and cuts the text at the marker.
7. The rendered text is tokenized like a completion prompt, with `add_special_tokens` false by
   default for chat (the request field changes it) and true by default for completions.

What this module cannot reproduce raises `UnsupportedLocally`; the caller then asks the engine's
`/tokenize`. A request vLLM would reject raises `InvalidChat` (HTTP 400 there, too).
"""

from __future__ import annotations

import copy
import json
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer

ContentFormat = Literal["string", "openai"]
ContentFormatOption = Literal["auto", "string", "openai"]


class UnsupportedLocally(Exception):
    """The local path cannot promise vLLM's exact count for this input: ask the engine."""


class InvalidChat(ValueError):
    """vLLM would reject this request (HTTP 400); the message says why."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


# ---------------------------------------------------------------------------------------------
# Constants taken from vLLM 0.32 and transformers 5 (names of the originals in comments).

_STANDARD_SPECIAL_TOKENS = (  # PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)
_TEXT_PART_FIELDS = {  # chat_utils.MM_PARSER_MAP, text entries (TEXT_PART_TYPES)
    "text": "text", "input_text": "text", "output_text": "text",
    "refusal": "refusal", "thinking": "thinking",
}
_KNOWN_PART_FIELDS = frozenset({  # chat_utils._KNOWN_CONTENT_PART_FIELDS
    "audio_embeds", "audio_url", "closed", "data", "file", "image_embeds", "image_pil",
    "image_url", "input_audio", "name", "prompt_cache_breakpoint", "refusal", "text",
    "thinking", "type", "uuid", "video_embeds", "video_url",
})
_MEDIA_PART_KEYS = frozenset({  # chat_utils._MEDIA_CONTENT_PART_KEYS, and tool_reference
    "image_url", "input_image", "image_embeds", "audio_embeds", "video_embeds", "prompt_embeds",
    "image_pil", "audio_url", "input_audio", "video_url", "tool_reference", "uuid", "file",
})
_HF_CHAT_PARAMS = frozenset({  # inspect.signature(PythonBackend.apply_chat_template)
    "self", "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
})
# chat_template_kwargs that change how vLLM/transformers call the template rather than what it
# sees (or collide with a variable they set): left to the engine.
_RESERVED_KWARGS = frozenset({
    "self", "conversation", "conversations", "messages", "chat_template", "tokenize",
    "return_assistant_tokens_mask",
})
_REASONING_EFFORTS = frozenset({"none", "minimal", "low", "medium", "high", "xhigh", "max"})
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # chat_template_utils.render_jinja_template
_BILLING_HEADER = "x-anthropic-billing-header"  # chat_utils._CLAUDE_CODE_BILLING_HEADER
# Files that make vLLM try an AutoProcessor chat template before the tokenizer's.
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "chat_template.json",
                    "video_preprocessor_config.json")
# Tokenizer classes whose encoding is tokenizer.json alone; others rebuild parts of it in code.
_GENERIC_TOKENIZER_CLASSES = frozenset({"PreTrainedTokenizerFast", "TokenizersBackend"})
_TEMPLATE_CACHE_SIZE = 32


# ---------------------------------------------------------------------------------------------
# The Jinja environment of transformers (utils/chat_template_utils.py,
# _cached_compile_jinja_template).


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (transformers tracks offsets)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: object,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)  # local time, as transformers renders it


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@dataclass(frozen=True)
class _Compiled:
    template: jinja2.Template | None
    error: str | None
    variables: frozenset[str]
    content_format: ContentFormat


def _compile(source: str) -> _Compiled:
    env = _environment()
    try:
        ast = env.parse(source)
        template = env.from_string(source)
    except jinja2.TemplateError as exc:
        # vLLM detects "string" for a template it cannot parse; rendering then fails with 400.
        return _Compiled(None, str(exc), frozenset(), "string")
    return _Compiled(template, None, frozenset(jinja2.meta.find_undeclared_variables(ast)),
                     _detect_content_format(ast))


# ---------------------------------------------------------------------------------------------
# Content format detection, ported from vllm/renderers/hf.py (_detect_content_format and the
# _iter_nodes_* helpers it uses). A template that loops over a message's content takes
# "openai" (list) content; any other takes "string" content.


class _DetectionError(Exception):
    pass


def _is_var(node: jinja2.nodes.Node, name: str) -> bool:
    return isinstance(node, jinja2.nodes.Name) and node.ctx == "load" and node.name == name


def _is_attr(node: jinja2.nodes.Node, name: str, key: str) -> bool:
    if isinstance(node, jinja2.nodes.Getitem):
        return (_is_var(node.node, name) and isinstance(node.arg, jinja2.nodes.Const)
                and node.arg.value == key)
    if isinstance(node, jinja2.nodes.Getattr):
        return _is_var(node.node, name) and node.attr == key
    return False


def _is_var_or_elems(node: jinja2.nodes.Node, name: str, key: str | None = None) -> bool:
    if isinstance(node, jinja2.nodes.Filter):
        return node.node is not None and _is_var_or_elems(node.node, name, key)
    if isinstance(node, jinja2.nodes.Test):
        return _is_var_or_elems(node.node, name, key)
    if isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Slice):
        return _is_var_or_elems(node.node, name, key)
    return _is_attr(node, name, key) if key else _is_var(node, name)


def _target_name(node: jinja2.nodes.Node) -> str:
    if not isinstance(node, jinja2.nodes.Name):
        raise _DetectionError  # vLLM asserts here; a failed detection means "string"
    return node.name


def _names_assigned_from(root: jinja2.nodes.Template, name: str) -> list[str]:
    names, seen, related = [name], {name}, deque([name])
    while related:
        current = related.popleft()
        for assign in root.find_all(jinja2.nodes.Assign):
            if _is_var_or_elems(assign.node, current):
                target = _target_name(assign.target)
                names.append(target)
                if target not in seen:  # vLLM only guards self-assignment; cycles would hang
                    seen.add(target)
                    related.append(target)
    return names


def _message_loop_names(root: jinja2.nodes.Template) -> list[str]:
    messages_names = _names_assigned_from(root, "messages")
    return [
        _target_name(loop.target) for loop in root.find_all(jinja2.nodes.For)
        if any(_is_var_or_elems(loop.iter, name) for name in messages_names)
    ]


def _content_loops(root: jinja2.nodes.Template) -> Iterator[str]:
    message_names = _message_loop_names(root)
    content_params_by_loop: dict[int, set[str]] = {}
    loops_in_macros: set[int] = set()
    for macro in root.find_all(jinja2.nodes.Macro):
        param_names = {arg.name for arg in macro.args}
        content_params: set[str] = set()
        for call in root.find_all(jinja2.nodes.Call):
            if isinstance(call.node, jinja2.nodes.Name) and call.node.name == macro.name:
                for i, arg in enumerate(call.args):
                    if i < len(macro.args) and any(
                        _is_var_or_elems(arg, name, "content") for name in message_names
                    ):
                        content_params.add(macro.args[i].name)
                for kwarg in call.kwargs:
                    if kwarg.key in param_names and any(
                        _is_var_or_elems(kwarg.value, name, "content") for name in message_names
                    ):
                        content_params.add(kwarg.key)
        for loop in macro.find_all(jinja2.nodes.For):
            loops_in_macros.add(id(loop))
            if content_params:
                content_params_by_loop[id(loop)] = content_params
    for loop in root.find_all(jinja2.nodes.For):
        if any(_is_var_or_elems(loop.iter, name, "content") for name in message_names):
            yield _target_name(loop.target)
            continue
        if not isinstance(loop.iter, jinja2.nodes.Name):
            continue
        params = content_params_by_loop.get(id(loop))
        bound_to_content = params is not None and loop.iter.name in params
        named_content = id(loop) not in loops_in_macros and loop.iter.name == "content"
        if bound_to_content or named_content:
            yield _target_name(loop.target)


def _detect_content_format(ast: jinja2.nodes.Template) -> ContentFormat:
    try:
        next(_content_loops(ast))
    except StopIteration:
        return "string"
    except (_DetectionError, RecursionError):
        return "string"
    return "openai"


# ---------------------------------------------------------------------------------------------
# Request normalisation: what vLLM's pydantic models and chat_utils make of the request.


def normalize_tools(tools: object) -> list[dict[str, object]]:
    """`[tool.model_dump() for tool in request.tools]` of vLLM's ChatCompletionToolsParam."""
    if not isinstance(tools, list):
        raise InvalidChat("tools must be a list of tool objects", "tools")
    out: list[dict[str, object]] = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise InvalidChat(f"{where} must be an object", "tools")
        if tool.get("type", "function") != "function":
            raise InvalidChat(f"{where}.type must be 'function'", "tools")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise InvalidChat(f"{where}.function must be an object", "tools")
        if not isinstance(fn.get("name"), str):
            raise InvalidChat(f"{where}.function.name must be a string", "tools")
        if not isinstance(fn.get("description"), str | None):
            raise InvalidChat(f"{where}.function.description must be a string", "tools")
        if not isinstance(fn.get("parameters"), dict | None):
            raise InvalidChat(f"{where}.function.parameters must be an object", "tools")
        for holder, key in ((fn, "strict"), (fn, "defer_loading"), (tool, "defer_loading")):
            if not isinstance(holder.get(key), bool | None):
                raise UnsupportedLocally(f"{where}: non-boolean {key}")
        function: dict[str, object] = {
            "name": fn["name"], "description": fn.get("description"),
            "parameters": fn.get("parameters"),
        }
        if fn.get("strict") is not None:
            function["strict"] = fn["strict"]
        defer = fn.get("defer_loading")
        if defer is None:
            defer = tool.get("defer_loading")  # _propagate_defer_loading
        if defer is not None:
            function["defer_loading"] = defer
        dumped: dict[str, object] = {"type": "function", "function": function}
        if tool.get("defer_loading") is not None:
            dumped["defer_loading"] = tool["defer_loading"]
        out.append(dumped)
    return out


def _text_parts(role: str, content: object, where: str) -> list[tuple[str, dict[str, object]]]:
    """The message's text parts as (text, extra fields); anything else is not ours to count."""
    if content is None:
        parts: list[object] = []
    elif isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = content
    else:
        raise InvalidChat(f"{where}.content must be a string or a list of content parts",
                          "messages")
    out: list[tuple[str, dict[str, object]]] = []
    for j, part in enumerate(parts):
        if isinstance(part, str):
            kind, text, extra = "text", part, {}
        elif isinstance(part, dict):
            given = part.get("type")
            if not isinstance(given, str) or given not in _TEXT_PART_FIELDS \
                    or any(key in part for key in _MEDIA_PART_KEYS):
                raise UnsupportedLocally(f"{where}.content[{j}]: a {given!r} part")
            kind = given
            value = part.get(_TEXT_PART_FIELDS[kind])
            if value is None:
                raise UnsupportedLocally(f"{where}.content[{j}]: a text part without text")
            if not isinstance(value, str):
                raise InvalidChat(f"{where}.content[{j}] text must be a string", "messages")
            text = value
            extra = {k: v for k, v in part.items() if k not in _KNOWN_PART_FIELDS}
        else:
            raise InvalidChat(f"{where}.content[{j}] must be an object", "messages")
        # _strip_claude_code_billing_header: system text parts drop that first line.
        if role == "system" and kind == "text" and text.startswith(_BILLING_HEADER):
            text = text.partition("\n")[2]
            if not text:
                continue
        out.append((text, extra))
    return out


def _tool_call(call: object, where: str) -> dict[str, object]:
    """A tool call as pydantic leaves it (`id`, `function` {`arguments`, `name`}, `type`, then
    unknown keys), with its JSON arguments parsed the way `_postprocess_messages` does."""
    if not isinstance(call, dict):
        raise UnsupportedLocally(f"{where}: not an object")
    fn = call.get("function")
    if not (isinstance(call.get("id"), str) and call.get("type") == "function"
            and isinstance(fn, dict) and isinstance(fn.get("name"), str)
            and isinstance(fn.get("arguments"), str)):
        raise UnsupportedLocally(f"{where}: not a plain function call")
    arguments: object = {}
    if fn["arguments"]:
        try:
            arguments = json.loads(fn["arguments"])
        except json.JSONDecodeError:
            arguments = {}
        if not isinstance(arguments, dict):
            arguments = {}
    function: dict[str, object] = {"arguments": arguments, "name": fn["name"]}
    function.update((k, v) for k, v in fn.items() if k not in function)
    out: dict[str, object] = {"id": call["id"], "function": function, "type": "function"}
    out.update((k, v) for k, v in call.items() if k not in out)
    return out


def normalize_messages(messages: object, content_format: ContentFormat) -> list[dict[str, Any]]:
    """The conversation vLLM hands to the chat template (`parse_chat_messages`)."""
    if not isinstance(messages, list):
        raise InvalidChat("messages must be a list of message objects", "messages")
    conversation: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise InvalidChat(f"{where} must be an object", "messages")
        role = msg.get("role")
        if not isinstance(role, str):
            raise InvalidChat(f"{where}.role must be a string", "messages")
        parts = _text_parts(role, msg.get("content"), where)
        content: object
        if content_format == "openai":
            content = [{"type": "text", "text": text, **extra} for text, extra in parts]
        else:
            content = "\n".join(text for text, _ in parts)
        out: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant":
            calls = msg.get("tool_calls")
            if calls is not None:
                if not isinstance(calls, list):
                    raise UnsupportedLocally(f"{where}.tool_calls is not a list")
                if calls:  # an empty list is dropped
                    out["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{j}]")
                                         for j, c in enumerate(calls)]
            reasoning = msg.get("reasoning")
            if reasoning is not None:
                if not isinstance(reasoning, str):
                    raise UnsupportedLocally(f"{where}.reasoning is not a string")
                out["reasoning"] = out["reasoning_content"] = reasoning
        elif role == "tool":
            if "tool_call_id" in msg:
                if not isinstance(msg["tool_call_id"], str | None):
                    raise UnsupportedLocally(f"{where}.tool_call_id is not a string")
                out["tool_call_id"] = msg["tool_call_id"]
            if isinstance(content, list):  # tool results are always joined into a string
                out["content"] = "\n".join(str(p["text"]) for p in content)
        if isinstance(msg.get("name"), str):
            out["name"] = msg["name"]
        elif msg.get("name") is not None:
            raise UnsupportedLocally(f"{where}.name is not a string")
        if isinstance(msg.get("task"), str):
            out["task"] = msg["task"]
        if role == "developer":
            if msg.get("tools") is not None:
                raise UnsupportedLocally(f"{where}: developer tools")
            out["tools"] = None
        conversation.append(out)
    return conversation


def _developer_to_system(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`_convert_developer_to_system` then `_consolidate_system_messages` (vllm/renderers/hf.py)."""
    converted = []
    for msg in conversation:
        if msg["role"] == "developer":
            msg = {k: v for k, v in msg.items() if k != "tools"} | {"role": "system"}
        converted.append(msg)
    contents: list[str] = []
    rest: list[dict[str, Any]] = []
    merge = False
    for i, msg in enumerate(converted):
        if msg["role"] != "system":
            rest.append(msg)
            continue
        if i > 0 or contents:
            merge = True
        content = msg.get("content", "")
        if isinstance(content, list):
            content = "\n".join(
                p["text"] if isinstance(p, dict) else p for p in content
                if (isinstance(p, dict) and "text" in p) or isinstance(p, str)
            )
        if content:
            contents.append(content)
    if not merge:
        return converted
    return [{"role": "system", "content": "\n\n".join(contents)}, *rest]


def _merge(defaults: Mapping[str, object], overrides: Mapping[str, object]) -> dict[str, object]:
    """vllm.renderers.params.merge_kwargs: overrides win unless they are None or "auto"."""
    return {**defaults, **{k: v for k, v in overrides.items()
                           if v is not None and not (isinstance(v, str) and v == "auto")}}


def check_chat_template_kwargs(kwargs: object) -> dict[str, object]:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise InvalidChat("chat_template_kwargs must be an object", "chat_template_kwargs")
    reserved = sorted(_RESERVED_KWARGS & kwargs.keys())
    if reserved:
        raise UnsupportedLocally(f"chat_template_kwargs sets {', '.join(reserved)}")
    tools = kwargs.get("tools")
    if tools is not None and not (isinstance(tools, list)
                                  and all(isinstance(t, dict) for t in tools)):
        raise UnsupportedLocally("chat_template_kwargs.tools is not a list of objects")
    return dict(kwargs)


def _check_documents(documents: object, *, strict: bool) -> None:
    if documents is None:
        return
    if not isinstance(documents, list) or not all(isinstance(d, dict) for d in documents):
        raise InvalidChat("Documents should be a list of dicts with 'title' and 'text' keys!",
                          "documents")
    if strict and not all(isinstance(v, str) for d in documents for v in d.values()):
        raise InvalidChat("documents must map names to strings", "documents")


# ---------------------------------------------------------------------------------------------


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
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                     (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                     (" 're", "'re")):
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
        self._compiled: dict[str, _Compiled] = {}
        post = tokenizer.post_processor
        self._special_margin = int(post.num_special_tokens_to_add(False)) if post else 0
        self._bound_factor, self._bound_normalize = self._bound_shape(tokenizer)

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
    ) -> PromptTokenizer:
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
        specials.update((k, v) for k, v in config.items()
                        if k.endswith("_token") and k not in specials and isinstance(v, str)
                        and k not in _STANDARD_SPECIAL_TOKENS)
        extra = config.get("extra_special_tokens")
        if isinstance(extra, dict):
            specials.update((k, v) for k, v in extra.items()
                            if isinstance(k, str) and isinstance(v, str))

        # transformers adds tokens named in the config that tokenizer.json does not have.
        present = {str(t.content) for t in tok.get_added_tokens_decoder().values()}
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            for spec in decoder.values():
                if isinstance(spec, dict) and isinstance(spec.get("content"), str) \
                        and spec["content"] not in present:
                    fields = {k: spec[k] for k in ("single_word", "lstrip", "rstrip",
                                                   "normalized", "special") if k in spec}
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
            inexact = (f"tokenizer_class {tokenizer_class!r} may rebuild its pipeline in "
                       "transformers instead of using tokenizer.json as is")

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
        return list(self._tok.encode(prompt, add_special_tokens=add_special_tokens).ids)

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

    def _compiled_template(self, source: str) -> _Compiled:
        compiled = self._compiled.get(source)
        if compiled is None:
            if len(self._compiled) >= _TEMPLATE_CACHE_SIZE:
                self._compiled.clear()
            compiled = self._compiled[source] = _compile(source)
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
        if add_generation_prompt and continue_final_message:
            raise InvalidChat("Cannot set both `continue_final_message` and "
                              "`add_generation_prompt` to True.")
        if chat_template is not None and not isinstance(chat_template, str):
            raise InvalidChat("chat_template must be a string", "chat_template")
        if reasoning_effort is not None and reasoning_effort not in _REASONING_EFFORTS:
            raise InvalidChat(f"reasoning_effort must be one of {sorted(_REASONING_EFFORTS)}",
                              "reasoning_effort")
        _check_documents(documents, strict=True)
        tool_dicts = normalize_tools(tools) if tools is not None else None
        user_kwargs = check_chat_template_kwargs(chat_template_kwargs)

        # ChatCompletionRequest.build_chat_params(...).with_defaults(...)
        extra: dict[str, object] = {
            "add_generation_prompt": add_generation_prompt,
            "continue_final_message": continue_final_message,
            "documents": documents, "reasoning_effort": reasoning_effort,
        }
        if reasoning_effort is not None and "enable_thinking" not in user_kwargs:
            extra["enable_thinking"] = reasoning_effort != "none"
        request_kwargs = _merge(user_kwargs, extra)
        kwargs = _merge(_merge(self._default_kwargs, {"tools": tool_dicts, "tokenize": False}),
                        request_kwargs)
        final_tools = kwargs.pop("tools", None)
        kwargs.pop("tokenize", None)
        _check_documents(kwargs.get("documents"), strict=False)

        source = self._resolve_template(chat_template or self._default_template, final_tools)
        compiled = self._compiled_template(source)
        content_format: ContentFormat = (compiled.content_format
                                         if self._content_format == "auto"
                                         else self._content_format)
        conversation = normalize_messages(messages, content_format)
        if any(m["role"] == "developer" for m in conversation) \
                and '"developer"' not in source and "'developer'" not in source:
            conversation = _developer_to_system(conversation)
        if compiled.template is None:  # vLLM fails outside its 400 handling here
            raise UnsupportedLocally(f"the chat template does not parse: {compiled.error}")
        if not conversation:
            raise InvalidChat("Cannot apply chat template to an empty conversation. "
                              "Provide at least one message.")

        # resolve_chat_template_kwargs keeps the template's variables and transformers'
        # parameters; apply_chat_template consumes its parameters and passes the rest, over the
        # special tokens, to the template.
        generation = bool(kwargs.get("add_generation_prompt", False))
        continue_final = bool(kwargs.get("continue_final_message", False))
        docs = kwargs.get("documents")
        variables: dict[str, object] = {**self.special_tokens, **{
            k: v for k, v in kwargs.items()
            if k in compiled.variables and k not in _HF_CHAT_PARAMS
        }}
        return _render(compiled.template, source, conversation, final_tools, docs, generation,
                       continue_final, variables)

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
            messages, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, tools=tools,
            chat_template=chat_template, chat_template_kwargs=chat_template_kwargs,
            documents=documents, reasoning_effort=reasoning_effort,
        )
        return self.encode_completion(text, add_special_tokens=add_special_tokens)


def _render(
    template: jinja2.Template,
    source: str,
    conversation: list[dict[str, Any]],
    tools: object,
    documents: object,
    add_generation_prompt: bool,
    continue_final_message: bool,
    variables: Mapping[str, object],
) -> str:
    """transformers' render_jinja_template for one conversation; errors become InvalidChat with
    the reason vLLM reports (`_template_error_reason`)."""
    final_text = ""
    if continue_final_message:
        conversation = copy.deepcopy(conversation)
        final = conversation[-1].get("content")
        if final is None:
            raise InvalidChat('continue_final_message is set but the final message has no '
                              '"content" to continue!')
        if "content" not in source:
            raise InvalidChat('continue_final_message is set to "content" but this is not an '
                              'accepted field in the chat_template')
        if isinstance(final, list | tuple):
            for block in reversed(final):
                if "text" in block:
                    final_text = str(block["text"])
                    block["text"] = block["text"] + _CONTINUE_TAG
                    break
            else:
                raise InvalidChat("continue_final_message is set but we could not find any "
                                  "text to continue in the final message!")
        else:
            final_text = str(final)
            conversation[-1]["content"] = final + _CONTINUE_TAG
    try:
        rendered = template.render(
            messages=conversation, tools=tools, documents=documents,
            add_generation_prompt=add_generation_prompt, **variables,
        )
    except Exception as exc:  # a template may raise anything; vLLM answers 400 with its reason
        raise InvalidChat(_error_reason(exc)) from exc
    if continue_final_message:
        tag = _CONTINUE_TAG.strip()
        if final_text.strip() not in rendered or tag not in rendered:
            raise InvalidChat("continue_final_message is set but the final message does not "
                              "appear in the chat after applying the chat template!")
        at = rendered.rindex(tag)
        if rendered[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            rendered = rendered[:at]
        else:
            rendered = rendered[:at].rstrip()
    return rendered


def _error_reason(exc: BaseException) -> str:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, jinja2.TemplateError):
            return str(current)
        current = current.__cause__ or current.__context__
    return str(exc)


def local_chat_supported(body: Mapping[str, object]) -> bool:
    """Whether a chat request's messages, tools and kwargs are within what the local path
    reproduces (text content only, plain function tools and calls, no kwargs that change how
    the template is called). Rendering may still raise UnsupportedLocally for reasons that
    depend on the model (no template, a processor template)."""
    try:
        normalize_messages(body.get("messages"), "openai")
        if body.get("tools") is not None:
            normalize_tools(body.get("tools"))
        check_chat_template_kwargs(body.get("chat_template_kwargs"))
    except UnsupportedLocally:
        return False
    except InvalidChat:
        return True  # the local path can tell the client what is wrong
    return True


def completion_prompts(prompt: object) -> Sequence[str | list[int]]:
    """A completion request's `prompt` as vLLM splits it (`prompt_to_seq`): one string, a list
    of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise InvalidChat("prompt must be a string, a list of strings, a list of token ids or "
                          "a list of token-id lists, and not empty", "prompt")
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
