"""Chat templates rendered as transformers renders them, and their content format detected as
vLLM detects it (vLLM 0.32, transformers 5), without either.

transformers renders with an `ImmutableSandboxedEnvironment(trim_blocks=True,
lstrip_blocks=True)`, the `loopcontrols` extension and a `{% generation %}` tag, its own `tojson`
filter (`ensure_ascii=False`, `indent`, `separators`, `sort_keys`), and the globals
`raise_exception` and `strftime_now`; the variables are `messages`, `tools`, `documents`,
`add_generation_prompt`, the named special tokens (`bos_token`, `eos_token`, ...) and the kwargs.
`continue_final_message` appends a marker to the final message's (last) text, renders, and cuts
the text at the marker.

The content format is read from the template's AST (`vllm/renderers/hf.py`,
`_detect_content_format`): "openai" when the template loops over `message['content']`, else
"string".
"""

from __future__ import annotations

import copy
import json
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.chat_messages import ContentFormat, InvalidChat
from engine.render_bound import LengthBound, analyse

_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # chat_template_utils.render_jinja_template


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
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@dataclass(frozen=True)
class CompiledTemplate:
    template: jinja2.Template | None
    error: str | None
    variables: frozenset[str]
    content_format: ContentFormat
    length_bounds: Mapping[str, LengthBound | None] = field(default_factory=dict)
    """Per content format, the template's proven length bound (`engine.render_bound`)."""


def compile_template(source: str) -> CompiledTemplate:
    env = _environment()
    try:
        ast = env.parse(source)
        template = env.from_string(source)
    except jinja2.TemplateError as exc:
        # vLLM detects "string" for a template it cannot parse; rendering then fails with 400.
        return CompiledTemplate(None, str(exc), frozenset(), "string")
    return CompiledTemplate(
        template,
        None,
        frozenset(jinja2.meta.find_undeclared_variables(ast)),
        detect_content_format(ast),
        {fmt: analyse(ast, fmt) for fmt in ("string", "openai")},
    )


# Content format detection, ported from vllm/renderers/hf.py (_detect_content_format and the
# _iter_nodes_* helpers it uses). A template that loops over a message's content takes
# "openai" (list) content; any other takes "string" content.


class _DetectionError(Exception):
    pass


def _is_var(node: jinja2.nodes.Node, name: str) -> bool:
    return isinstance(node, jinja2.nodes.Name) and node.ctx == "load" and node.name == name


def _is_attr(node: jinja2.nodes.Node, name: str, key: str) -> bool:
    if isinstance(node, jinja2.nodes.Getitem):
        return (
            _is_var(node.node, name)
            and isinstance(node.arg, jinja2.nodes.Const)
            and node.arg.value == key
        )
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
        _target_name(loop.target)
        for loop in root.find_all(jinja2.nodes.For)
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


def detect_content_format(ast: jinja2.nodes.Template) -> ContentFormat:
    try:
        next(_content_loops(ast))
    except StopIteration:
        return "string"
    except (_DetectionError, RecursionError):
        return "string"
    return "openai"


# Rendering: transformers' render_jinja_template, with vLLM's error reasons.


def render_template(
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
            raise InvalidChat(
                'continue_final_message is set but the final message has no "content" to continue!'
            )
        if "content" not in source:
            raise InvalidChat(
                'continue_final_message is set to "content" but this is not an '
                "accepted field in the chat_template"
            )
        if isinstance(final, list | tuple):
            for block in reversed(final):
                if "text" in block:
                    final_text = str(block["text"])
                    block["text"] = block["text"] + _CONTINUE_TAG
                    break
            else:
                raise InvalidChat(
                    "continue_final_message is set but we could not find any "
                    "text to continue in the final message!"
                )
        else:
            final_text = str(final)
            conversation[-1]["content"] = final + _CONTINUE_TAG
    try:
        rendered = template.render(
            messages=conversation,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except Exception as exc:  # a template may raise anything; vLLM answers 400 with its reason
        raise InvalidChat(_error_reason(exc)) from exc
    if continue_final_message:
        tag = _CONTINUE_TAG.strip()
        if final_text.strip() not in rendered or tag not in rendered:
            raise InvalidChat(
                "continue_final_message is set but the final message does not "
                "appear in the chat after applying the chat template!"
            )
        at = rendered.rindex(tag)
        if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
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
