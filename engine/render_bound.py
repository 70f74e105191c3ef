"""An upper bound of a chat template's rendered length, in UTF-8 bytes, without rendering it.

Rendering a chat template in Jinja's sandbox costs tens of microseconds for a one-line chat;
admission only needs a number that is certainly not below the prompt's length when the request
is far from every limit. `analyse(ast)` reads a template once and, when the template belongs to
the small family it can prove things about, returns a `LengthBound`: constants for the text the
template writes around the messages and, per loop over `messages`, how many times each message's
role and text can be written. `LengthBound.of(conversation, variables)` then bounds the rendered
length from the messages' byte lengths alone.

The family (anything else: `analyse` returns None and the caller renders):

- the body holds only literal text, `{{ ... }}` outputs, `{% if %}` (with elif/else) and
  `{% for %}` loops, `{% break %}` / `{% continue %}`; no `set`, macros, calls (`raise_exception`,
  `namespace`, ...), includes, filters blocks or the `{% generation %}` tag outside branches
  proven dead;
- an output is literal text, a constant, a named special token (`bos_token`, ...), a message's
  `role`, a message's `content` where it is certainly a string, a content part's `text` inside a
  loop over a message's `content`, the `trim` of one of those, or a `+` / `~` of them;
- loops iterate over `messages` (or a slice of it) at the top level, and over the loop
  message's `content` inside that; nothing else.

Why the bound holds: a template of the family writes, outside message loops, only literal text
and named tokens, each at most once (an `if` counts all its branches, so whichever runs writes
no more than their sum). Each iteration of a message loop over message m writes at most the loop
body's literal text C, plus for each output of `role` the role's bytes, plus for each output of
`content` or a part's `text` at most the message's text bytes T(m): a content output writes the
content string; a part-text output inside the content loop writes, over all parts, at most the
sum of the parts' texts, which is T(m) (in "string" content format the loop walks characters
and `part['text']` writes nothing). Literal text inside the content loop is paid once per
element of the content. `trim` only shortens. A loop's `else`, a loop filter or a slice only
run fewer iterations. Branches whose test is certainly false under the facts the caller
guarantees (`tools` and `documents` are None, no message holds a key other than `role` and
`content`) are dropped: a false test never runs its branch.

What the caller must check per request (`applies`): no tools, no documents, no continued final
message, every message only `role` and `content`, and every named token output a string.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jinja2.nodes as n

_ABSENT_NAMES = frozenset({"tools", "documents"})
"""Template variables that are None whenever the bound is used."""
_MESSAGE_KEYS = frozenset({"role", "content"})
"""The only keys of a message when the bound is used."""


class _NotInFamily(Exception):
    pass


@dataclass
class _Loop:
    """Per message of one loop over `messages`: bytes of literal text, role outputs, text
    outputs, and literal bytes paid once per element of the message's content."""

    const: int = 0
    roles: int = 0
    texts: int = 0
    per_element: int = 0


@dataclass
class LengthBound:
    """What a template of the family writes, as counts (see the module's proof)."""

    const: int = 0
    names: list[str] = field(default_factory=list)
    """Named variables written outside message loops (each once)."""
    loops: list[_Loop] = field(default_factory=list)
    loop_names: list[str] = field(default_factory=list)
    """Named variables written once per message, summed over all message loops."""

    def of(self, conversation: Sequence[Mapping[str, Any]], variables: Mapping[str, object]) -> int:
        """Bytes the rendered text certainly does not exceed, for a conversation that
        `applies`. Raises TypeError when a named token is not a string."""
        total, const, roles, texts, per_element = self.sums(variables)
        for message in conversation:
            content = message["content"]
            if isinstance(content, str):
                text = _utf8_len(content)
            else:
                text = sum(_utf8_len(str(part["text"])) for part in content)
            total += const + roles * _utf8_len(message["role"]) + texts * text
            total += per_element * len(content)
        return total

    def of_plain(
        self,
        messages: Sequence[Mapping[str, str]],
        sums: tuple[int, int, int, int, int],
        *,
        parts: bool,
    ) -> int:
        """`of` the conversation vLLM makes of plain messages (`chat_messages.plain_messages`)
        without making it, with the template's `sums` for the request's variables: each
        message's role and string content as they are, the content seen as one text part
        when `parts` (the "openai" content format), except a tool message's (vLLM joins a
        tool result's parts back into a string)."""
        total, const, roles, texts, per_element = sums
        for message in messages:
            role, content = message["role"], message["content"]
            total += const + roles * _utf8_len(role) + texts * _utf8_len(content)
            total += per_element * (1 if parts and role != "tool" else len(content))
        return total

    def sums(self, variables: Mapping[str, object]) -> tuple[int, int, int, int, int]:
        """(bytes written once, and per message: constant bytes, role outputs, text outputs,
        literal bytes per content element), summed over the template's message loops; the
        same for every request with these variables. Raises TypeError when a named token is
        not a string."""
        named = 0
        for name in self.names:
            named += _bytes_of(variables.get(name))
        per_message_named = 0
        for name in self.loop_names:
            per_message_named += _bytes_of(variables.get(name))
        loops = self.loops
        return (
            self.const + named,
            sum(loop.const for loop in loops) + per_message_named,
            sum(loop.roles for loop in loops),
            sum(loop.texts for loop in loops),
            sum(loop.per_element for loop in loops),
        )


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def applies(
    conversation: Sequence[Mapping[str, Any]],
    tools: object,
    documents: object,
    continue_final_message: bool,
) -> bool:
    """Whether a request meets the facts the bound was proven under."""
    if tools is not None or documents is not None or continue_final_message:
        return False
    for message in conversation:
        if message.keys() - _MESSAGE_KEYS:
            return False
        content = message["content"]
        if not isinstance(content, str) and not (
            isinstance(content, list)
            and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content)
        ):
            return False
    return True


def _bytes_of(value: object) -> int:
    if not isinstance(value, str):
        raise TypeError("a named token written by the template is not a string")
    return len(value.encode("utf-8"))


def analyse(ast: n.Template, content_format: str) -> LengthBound | None:
    """The template's LengthBound, or None when it is not of the family."""
    bound = LengthBound()
    try:
        _Walker(bound, content_format).body(ast.body, scope=None)
    except (_NotInFamily, RecursionError):
        return None
    return bound


@dataclass
class _Scope:
    """Inside a loop over messages: the message variable, the loop's counts, and the part
    variable when inside the loop over the message's content."""

    message: str
    loop: _Loop
    part: str | None = None
    string_content: bool = False
    """Inside an `if <message>.content is string` branch."""


class _Walker:
    def __init__(self, bound: LengthBound, content_format: str) -> None:
        self.bound = bound
        self.string_format = content_format == "string"

    # -- statements ----------------------------------------------------------------------------

    def body(self, nodes: Sequence[n.Node], scope: _Scope | None) -> None:
        for node in nodes:
            self.statement(node, scope)

    def statement(self, node: n.Node, scope: _Scope | None) -> None:
        if isinstance(node, n.Output):
            for child in node.nodes:
                self.output(child, scope)
        elif isinstance(node, n.If):
            self.if_(node, scope)
        elif isinstance(node, n.For):
            self.for_(node, scope)
        elif type(node).__name__ in ("Break", "Continue"):
            pass
        else:
            raise _NotInFamily(type(node).__name__)

    def if_(self, node: n.If, scope: _Scope | None) -> None:
        # The test may be anything without calls; it writes nothing.
        self.no_calls(node.test)
        if not self.dead(node.test, scope):
            guarded = scope
            if scope is not None and self.is_string_test(node.test, scope):
                guarded = _Scope(scope.message, scope.loop, scope.part, True)
            self.body(node.body, guarded)
        for elif_ in node.elif_:
            self.if_(elif_, scope)
        self.body(node.else_, scope)

    def for_(self, node: n.For, scope: _Scope | None) -> None:
        if node.recursive or not isinstance(node.target, n.Name):
            raise _NotInFamily("loop shape")
        if node.test is not None:
            self.no_calls(node.test)
        target = node.target.name
        if scope is None:
            if not _is_messages(node.iter):
                raise _NotInFamily("a top-level loop not over messages")
            loop = _Loop()
            self.bound.loops.append(loop)
            self.body(node.body, _Scope(target, loop))
            self.body(node.else_, None)
            return
        if (
            scope.part is None
            and target != scope.message  # a part's keys are not a message's
            and _is_field(node.iter, scope.message, "content")
        ):
            self.body(node.body, _Scope(scope.message, scope.loop, target, scope.string_content))
            self.body(node.else_, scope)
            return
        raise _NotInFamily("a nested loop")

    # -- outputs -------------------------------------------------------------------------------

    def output(self, node: n.Node, scope: _Scope | None) -> None:
        if isinstance(node, n.TemplateData):
            self.literal(len(node.data.encode("utf-8")), scope)
            return
        for leaf in self.leaves(node, scope, in_concat=False):
            self.count(leaf, scope)

    def literal(self, size: int, scope: _Scope | None) -> None:
        if scope is None:
            self.bound.const += size
        elif scope.part is not None:
            scope.loop.per_element += size
        else:
            scope.loop.const += size

    def count(self, leaf: tuple[str, object], scope: _Scope | None) -> None:
        kind, value = leaf
        if kind == "const":
            assert isinstance(value, int)
            self.literal(value, scope)
        elif kind == "name":
            assert isinstance(value, str)
            if scope is None:
                self.bound.names.append(value)
            elif scope.part is not None:
                raise _NotInFamily("a named token inside a content loop")
            else:
                self.bound.loop_names.append(value)
        elif kind == "role":
            assert scope is not None
            scope.loop.roles += 1
        else:  # "text": a content string, or all parts' texts over a content loop
            assert scope is not None
            scope.loop.texts += 1

    def leaves(
        self, node: n.Node, scope: _Scope | None, *, in_concat: bool
    ) -> list[tuple[str, object]]:
        """What an output expression writes, as leaves; raises for anything else."""
        if isinstance(node, n.Const):
            return [("const", _const_bytes(node.value))]
        if isinstance(node, n.Add | n.Concat):
            parts = [node.left, node.right] if isinstance(node, n.Add) else list(node.nodes)
            out: list[tuple[str, object]] = []
            for part in parts:
                out.extend(self.leaves(part, scope, in_concat=True))
            if isinstance(node, n.Add) and any(kind == "text-part" for kind, _ in out):
                raise _NotInFamily("a part's text in '+' (it may be undefined)")
            return out
        if isinstance(node, n.Filter) and node.name == "trim" and node.node is not None:
            _no_arguments(node)
            return self.leaves(node.node, scope, in_concat=in_concat)
        if isinstance(node, n.Name) and node.ctx == "load":
            if node.name in _UNWRITABLE or (scope is not None and node.name in _scope_names(scope)):
                raise _NotInFamily(f"writes {node.name}")
            return [("name", node.name)]
        if scope is not None:
            leaf = self.message_leaf(node, scope, in_concat=in_concat)
            if leaf is not None:
                return [leaf]
        raise _NotInFamily(f"writes {type(node).__name__}")

    def message_leaf(
        self, node: n.Node, scope: _Scope, *, in_concat: bool
    ) -> tuple[str, object] | None:
        """A message's role, its content where certainly a string, or a part's text."""
        if _is_field(node, scope.message, "role"):
            return ("role", None)
        if _is_field(node, scope.message, "content") and (
            self.string_format or scope.string_content
        ):
            return ("text", None)
        if scope.part is not None and _is_field(node, scope.part, "text"):
            # Over all parts at most the message's text; a string content's characters have
            # no 'text' (undefined, written as nothing; in '+' it would raise).
            return ("text-part", None) if in_concat else ("text", None)
        return None

    # -- tests ---------------------------------------------------------------------------------

    def no_calls(self, node: n.Node) -> None:
        """A test of the family: cannot raise and writes nothing (`_safe_test`)."""
        if not _safe_test(node):
            raise _NotInFamily("a test outside the family")

    def dead(self, test: n.Node, scope: _Scope | None) -> bool:
        """Whether a test is certainly false under the facts (see `applies`)."""
        if isinstance(test, n.And):
            return self.dead(test.left, scope) or self.dead(test.right, scope)
        if isinstance(test, n.Name):
            return test.name in _ABSENT_NAMES
        if self.absent_field(test, scope):
            return True  # undefined: false
        if isinstance(test, n.Test) and not test.args:
            if test.name == "defined" and self.absent_field(test.node, scope):
                return True
            if test.name == "string" and (
                self.absent_field(test.node, scope)
                or (isinstance(test.node, n.Name) and test.node.name in _ABSENT_NAMES)
            ):
                return True
        if isinstance(test, n.Not) and isinstance(test.node, n.Test):
            inner = test.node
            if inner.name == "none" and isinstance(inner.node, n.Name):
                return inner.node.name in _ABSENT_NAMES  # None is none
        return False

    def absent_field(self, node: n.Node, scope: _Scope | None) -> bool:
        if scope is None:
            return False
        key = _field_key(node, scope.message)
        return key is not None and key not in _MESSAGE_KEYS

    def is_string_test(self, test: n.Node, scope: _Scope) -> bool:
        if isinstance(test, n.And):
            return self.is_string_test(test.left, scope) or self.is_string_test(test.right, scope)
        return (
            isinstance(test, n.Test)
            and test.name == "string"
            and not test.args
            and _is_field(test.node, scope.message, "content")
        )


_SAFE_TESTS = frozenset(
    {
        "defined",
        "undefined",
        "none",
        "string",
        "number",
        "mapping",
        "iterable",
        "sequence",
        "true",
        "false",
        "boolean",
        "integer",
        "float",
    }
)
_SAFE_FILTERS = frozenset({"trim", "lower", "upper", "string"})
"""Filters that turn any value into text (never raise)."""


def _safe_test(node: n.Node) -> bool:
    """Whether a test expression is certainly evaluated without an error: names, constants,
    items and attributes of them (undefined when missing), type tests, equality, `and`, `or`,
    `not`, text filters. No calls, no ordering comparisons (which raise on undefined)."""
    if isinstance(node, n.Name | n.Const):
        return True
    if isinstance(node, n.Getitem | n.Getattr):
        # One level only: an item of a missing item is an error (jinja2.Undefined raises).
        # messages[0] and messages[-1] always exist (the conversation is not empty).
        if isinstance(node, n.Getitem) and not isinstance(node.arg, n.Const):
            return False
        if isinstance(node, n.Getattr) and node.attr.startswith("_"):
            return False  # the sandbox's territory
        inner = node.node
        return isinstance(inner, n.Name) or (
            isinstance(inner, n.Getitem)
            and _is_messages(inner.node)
            and isinstance(inner.node, n.Name)
            and isinstance(inner.arg, n.Const)
            and inner.arg.value in (0, -1)
        )
    if isinstance(node, n.And | n.Or):
        return _safe_test(node.left) and _safe_test(node.right)
    if isinstance(node, n.Not):
        return _safe_test(node.node)
    if isinstance(node, n.Test):
        return (
            node.name in _SAFE_TESTS
            and not (node.args or node.kwargs or node.dyn_args or node.dyn_kwargs)
            and _safe_test(node.node)
        )
    if isinstance(node, n.Filter):
        return (
            node.name in _SAFE_FILTERS
            and node.node is not None
            and not (node.args or node.kwargs or node.dyn_args or node.dyn_kwargs)
            and _safe_test(node.node)
        )
    if isinstance(node, n.Compare):
        return _safe_test(node.expr) and all(
            op.op in ("eq", "ne") and _safe_test(op.expr) for op in node.ops
        )
    return False


_UNWRITABLE = _ABSENT_NAMES | {"messages", "add_generation_prompt", "loop"}
"""Names whose written form is not a named token's text."""


def _no_arguments(node: n.Filter) -> None:
    if node.args or node.kwargs or node.dyn_args or node.dyn_kwargs:
        raise _NotInFamily("trim with arguments")  # trim(chars) strips other characters


def _const_bytes(value: object) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    if value is None or isinstance(value, bool | int):
        return len(str(value))
    raise _NotInFamily("a constant")


def _scope_names(scope: _Scope) -> set[str]:
    return {scope.message} | ({scope.part} if scope.part else set())


def _is_messages(node: n.Node) -> bool:
    if isinstance(node, n.Name):
        return node.name == "messages" and node.ctx == "load"
    if isinstance(node, n.Getitem) and isinstance(node.arg, n.Slice):
        return _is_messages(node.node)
    if isinstance(node, n.Filter) and node.name in ("reverse",) and node.node is not None:
        return _is_messages(node.node)
    return False


def _field_key(node: n.Node, var: str) -> str | None:
    """The key of `var['key']` / `var.key`, else None."""
    if isinstance(node, n.Getitem):
        if (
            isinstance(node.node, n.Name)
            and node.node.name == var
            and isinstance(node.arg, n.Const)
            and isinstance(node.arg.value, str)
        ):
            return node.arg.value
        return None
    if isinstance(node, n.Getattr) and isinstance(node.node, n.Name) and node.node.name == var:
        return node.attr
    return None


def _is_field(node: n.Node, var: str, key: str) -> bool:
    return _field_key(node, var) == key
