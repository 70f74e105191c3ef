"""What vLLM makes of a chat request's messages, tools and template kwargs before it renders
them (vLLM 0.32, `vllm/renderers/chat_utils.py` and `vllm/renderers/hf.py`), without vLLM.

A string content becomes one text part; text parts (`text`, `input_text`, `output_text`,
`refusal`, `thinking`, plain strings) are joined with "\\n" into a string when the template's
*content format* is "string", or kept as `{"type": "text", "text": ...}` dicts (plus unknown extra
keys) when it is "openai" (`_parse_chat_message_content`, `_postprocess_messages`). Only `role`,
`content`, `tool_calls`/`reasoning`/`reasoning_content` (assistant), `tool_call_id` (tool, whose
content is always joined into a string), `name`, `task` and `tools` (developer) survive. Tool-call
arguments given as JSON text become dicts (`{}` when not an object). A `developer` message is
turned into `system` (and system messages merged first) when the template never mentions the
developer role.

What the local path cannot reproduce raises `UnsupportedLocally` (the caller then asks the
engine's `/tokenize`); what vLLM would reject raises `InvalidChat` (HTTP 400 there, too).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

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


# Constants taken from vLLM 0.32 (names of the originals in comments).
_TEXT_PART_FIELDS = {  # chat_utils.MM_PARSER_MAP, text entries (TEXT_PART_TYPES)
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
}
_KNOWN_PART_FIELDS = frozenset(
    {  # chat_utils._KNOWN_CONTENT_PART_FIELDS
        "audio_embeds",
        "audio_url",
        "closed",
        "data",
        "file",
        "image_embeds",
        "image_pil",
        "image_url",
        "input_audio",
        "name",
        "prompt_cache_breakpoint",
        "refusal",
        "text",
        "thinking",
        "type",
        "uuid",
        "video_embeds",
        "video_url",
    }
)
_MEDIA_PART_KEYS = frozenset(
    {  # chat_utils._MEDIA_CONTENT_PART_KEYS, and tool_reference
        "image_url",
        "input_image",
        "image_embeds",
        "audio_embeds",
        "video_embeds",
        "prompt_embeds",
        "image_pil",
        "audio_url",
        "input_audio",
        "video_url",
        "tool_reference",
        "uuid",
        "file",
    }
)
# chat_template_kwargs that change how vLLM/transformers call the template rather than what it
# sees (or collide with a variable they set): left to the engine.
_RESERVED_KWARGS = frozenset(
    {
        "self",
        "conversation",
        "conversations",
        "messages",
        "chat_template",
        "tokenize",
        "return_assistant_tokens_mask",
    }
)
_BILLING_HEADER = "x-anthropic-billing-header"  # chat_utils._CLAUDE_CODE_BILLING_HEADER


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
            "name": fn["name"],
            "description": fn.get("description"),
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
        raise InvalidChat(
            f"{where}.content must be a string or a list of content parts", "messages"
        )
    out: list[tuple[str, dict[str, object]]] = []
    for j, part in enumerate(parts):
        if isinstance(part, str):
            kind, text, extra = "text", part, {}
        elif isinstance(part, dict):
            given = part.get("type")
            if (
                not isinstance(given, str)
                or given not in _TEXT_PART_FIELDS
                or any(key in part for key in _MEDIA_PART_KEYS)
            ):
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
    if not (
        isinstance(call.get("id"), str)
        and call.get("type") == "function"
        and isinstance(fn, dict)
        and isinstance(fn.get("name"), str)
        and isinstance(fn.get("arguments"), str)
    ):
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


def plain_messages(messages: object) -> bool:
    """Whether `normalize_messages` keeps each message's role and text as they are and adds
    nothing: a non-empty list of messages that are each only a string `role` (not a
    developer's, which `developer_to_system` rewrites) and a string `content` (not a system
    one that starts with the billing header, which is cut). Such a conversation is, as the
    template sees it, the messages themselves in "string" content format and each content as
    one text part in "openai" format."""
    if type(messages) is not list or not messages:
        return False
    for msg in messages:
        if type(msg) is not dict or len(msg) != 2:
            return False
        role, content = msg.get("role"), msg.get("content")
        if type(role) is not str or type(content) is not str or role == "developer":
            return False
        if role == "system" and content.startswith(_BILLING_HEADER):
            return False
    return True


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
                    out["tool_calls"] = [
                        _tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)
                    ]
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


def developer_to_system(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
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
                p["text"] if isinstance(p, dict) else p
                for p in content
                if (isinstance(p, dict) and "text" in p) or isinstance(p, str)
            )
        if content:
            contents.append(content)
    if not merge:
        return converted
    return [{"role": "system", "content": "\n\n".join(contents)}, *rest]


def merge_kwargs(
    defaults: Mapping[str, object], overrides: Mapping[str, object]
) -> dict[str, object]:
    """vllm.renderers.params.merge_kwargs: overrides win unless they are None or "auto"."""
    return {
        **defaults,
        **{
            k: v
            for k, v in overrides.items()
            if v is not None and not (isinstance(v, str) and v == "auto")
        },
    }


def check_chat_template_kwargs(kwargs: object) -> dict[str, object]:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise InvalidChat("chat_template_kwargs must be an object", "chat_template_kwargs")
    reserved = sorted(_RESERVED_KWARGS & kwargs.keys())
    if reserved:
        raise UnsupportedLocally(f"chat_template_kwargs sets {', '.join(reserved)}")
    tools = kwargs.get("tools")
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(t, dict) for t in tools)
    ):
        raise UnsupportedLocally("chat_template_kwargs.tools is not a list of objects")
    return dict(kwargs)


def check_documents(documents: object, *, strict: bool) -> None:
    if documents is None:
        return
    if not isinstance(documents, list) or not all(isinstance(d, dict) for d in documents):
        raise InvalidChat(
            "Documents should be a list of dicts with 'title' and 'text' keys!", "documents"
        )
    if strict and not all(isinstance(v, str) for d in documents for v in d.values()):
        raise InvalidChat("documents must map names to strings", "documents")


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
