"""Structured outputs, checked before the grammar compiler sees them.

vLLM reads a constraint from `response_format` (json_schema, json_object, structural_tag),
`structured_outputs` (json, regex, choice, grammar, json_object, structural_tag,
whitespace_pattern), the older `guided_json` / `guided_regex` / `guided_choice` /
`guided_grammar` / `guided_whitespace_pattern` of engines before 0.10, and, when `tool_choice`
is `required` or a named function, `tools[].function.parameters`. Tool parameters are checked
whatever `tool_choice` says: a tool parser may compile them too, and a bad `type` in one
crashed the server (CVE-2025-48944).

A schema is walked once, iteratively, through the keywords that hold subschemas:
- crash class: a `type` that is not a JSON Schema type, a subschema that is neither an object
  nor a boolean, a `$ref` that does not resolve inside the schema (CVE-2025-48942), and a loop
  of `$ref`s that never consumes any input (a segfault of the grammar compiler on vLLM 0.9.2).
  The loop is found in the graph of "no progress" steps: `$ref`, `allOf` / `anyOf` / `oneOf`,
  `not`, `if` / `then` / `else`, `dependentSchemas`. Recursion through `properties`, `items`
  and the other keywords that step into a part of the value is legitimate and stays;
- cost class: bytes of the schema as JSON, nesting of subschemas (deeply nested `oneOf` wedged
  the engine, vllm#54003), entries of one `enum` (a huge enum: about 73 s of compile on the CPU
  engine) or of one `oneOf` / `anyOf` / `allOf`, regex and grammar lengths, choice counts.

Every check yields `Finding`s in the order it meets them, the cheap ones first; the caller
stops at the first one it must act on. Pure: no I/O, no clock.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import unquote

from gateway.config import Limits
from gateway.limit_names import Finding, Limit

STRUCTURED_FIELDS: frozenset[str] = frozenset(
    {
        "response_format",
        "structured_outputs",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "guided_whitespace_pattern",
        "tools",
    }
)
"""Top-level fields this module reads: a request with none of them is not looked at."""

JSON_TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})

# Keywords that hold subschemas. "Progress" ones step into a part of the value (a property,
# an item); the others apply to the same value again.
_PROGRESS_MAPS = ("properties", "patternProperties")
_PROGRESS_ONE = (
    "additionalProperties",
    "items",
    "contains",
    "propertyNames",
    "additionalItems",
    "unevaluatedItems",
    "unevaluatedProperties",
)
_PROGRESS_LISTS = ("prefixItems", "items")  # `items` as a list: draft 4's tuple form
_SAME_LISTS = ("allOf", "anyOf", "oneOf")
_SAME_ONE = ("not", "if", "then", "else")
_SAME_MAPS = ("dependentSchemas",)
_DEFINITIONS = ("$defs", "definitions")


def structured_findings(body: Mapping[str, Any], limits: Limits) -> Iterator[Finding]:
    """Findings about every structured-output constraint of a request body."""
    response_format = body.get("response_format")
    structured = body.get("structured_outputs")
    tools = body.get("tools")
    if not limits.structured_outputs:
        yield from _switched_off(body)
    if isinstance(response_format, Mapping):
        yield from _response_format(response_format, limits)
    if isinstance(structured, Mapping):
        yield from _constraints(structured, "structured_outputs", "structured_outputs.", limits)
    legacy = {key[len("guided_") :]: body.get(key) for key in _LEGACY}
    if any(value is not None for value in legacy.values()):
        for key in _LEGACY:
            if body.get(key) is not None:
                yield from _constraints(
                    {key[len("guided_") :]: body[key]}, key, "", limits, legacy=True
                )
    if isinstance(tools, list):
        for index, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, Mapping) else None
            parameters = function.get("parameters") if isinstance(function, Mapping) else None
            if parameters is not None:
                yield from schema_findings(
                    parameters, "tools", f"tools[{index}].function.parameters", limits
                )


_LEGACY = (
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_whitespace_pattern",
)


def _switched_off(body: Mapping[str, Any]) -> Iterator[Finding]:
    response_format = body.get("response_format")
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    used = [key for key in ("structured_outputs", *_LEGACY) if body.get(key) is not None]
    if kind not in (None, "text"):
        used.insert(0, "response_format")
    for key in used:
        yield Finding(
            Limit.STRUCTURED_OUTPUTS,
            key,
            f"Structured outputs are turned off for this model on this server (its "
            f"limits.structured_outputs policy); remove {key}.",
        )
    choice = body.get("tool_choice")
    if body.get("tools") and (choice == "required" or isinstance(choice, Mapping)):
        yield Finding(
            Limit.STRUCTURED_OUTPUTS,
            "tool_choice",
            "Structured outputs are turned off for this model on this server (its "
            "limits.structured_outputs policy), and tool_choice 'required' or a named "
            "function compiles the tool's parameters into one; use tool_choice 'auto'.",
        )


def _response_format(response_format: Mapping[str, Any], limits: Limits) -> Iterator[Finding]:
    kind = response_format.get("type")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if isinstance(spec, Mapping) and spec.get("schema") is not None:
            yield from schema_findings(
                spec["schema"], "response_format", "response_format.json_schema.schema", limits
            )
    elif kind == "structural_tag":
        size = _json_bytes(response_format)
        if size > limits.max_schema_bytes:
            yield _too_many_bytes("response_format", "response_format", size, limits)


def _constraints(
    spec: Mapping[str, Any], param: str, prefix: str, limits: Limits, *, legacy: bool = False
) -> Iterator[Finding]:
    """The constraints of `structured_outputs` (or one `guided_*` field, as {kind: value})."""
    where = (lambda key: param) if legacy else (lambda key: prefix + key)
    schema = spec.get("json")
    if schema is not None:
        yield from schema_findings(schema, param, where("json"), limits)
    for key, bound, name in (
        ("regex", limits.max_regex_chars, Limit.MAX_REGEX_CHARS),
        ("whitespace_pattern", limits.max_regex_chars, Limit.MAX_REGEX_CHARS),
        ("grammar", limits.max_grammar_chars, Limit.MAX_GRAMMAR_CHARS),
        ("structural_tag", limits.max_schema_bytes, Limit.MAX_SCHEMA_BYTES),
    ):
        value = spec.get(key)
        if isinstance(value, str) and len(value) > bound:
            yield Finding(
                name,
                param,
                f"{where(key)} has {len(value)} characters; this server accepts at most "
                f"{bound} for this model (its limits.{name.value} policy).",
            )
    choice = spec.get("choice")
    if isinstance(choice, list) and len(choice) > limits.max_schema_enum:
        yield Finding(
            Limit.MAX_SCHEMA_ENUM,
            param,
            f"{where('choice')} has {len(choice)} choices; this server accepts at most "
            f"{limits.max_schema_enum} for this model (its limits.max_schema_enum policy).",
        )


def _json_bytes(value: object) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def _too_many_bytes(param: str, where: str, size: int, limits: Limits) -> Finding:
    return Finding(
        Limit.MAX_SCHEMA_BYTES,
        param,
        f"{where} is {size} bytes of JSON; this server accepts schemas of at most "
        f"{limits.max_schema_bytes} bytes for this model (its limits.max_schema_bytes policy).",
    )


def _invalid(param: str, where: str, what: str) -> Finding:
    return Finding(Limit.SCHEMA_INVALID, param, f"{where} is not a valid JSON schema: {what}.")


def schema_findings(schema: object, param: str, where: str, limits: Limits) -> Iterator[Finding]:
    """Findings about one JSON schema (`schema` as sent: an object, a boolean, or JSON text)."""
    if isinstance(schema, str):
        if len(schema.encode()) > limits.max_schema_bytes:
            yield _too_many_bytes(param, where, len(schema.encode()), limits)
        try:
            schema = json.loads(schema)
        except ValueError:
            yield _invalid(param, where, "the text is not JSON")
            return
    elif isinstance(schema, dict | list):
        size = _json_bytes(schema)
        if size > limits.max_schema_bytes:
            yield _too_many_bytes(param, where, size, limits)
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        yield _invalid(param, where, "a schema is an object or a boolean")
        return
    yield from _walk(schema, param, where, limits)


# How each subschema keyword is walked: a map of schemas, a list of them, or one; and
# whether it steps into a part of the value (progress) or applies to the same value again.
_MAP, _LIST, _ONE = 1, 2, 3
_KEYWORDS: dict[str, tuple[int, bool]] = {
    **dict.fromkeys((*_PROGRESS_MAPS, *_DEFINITIONS), (_MAP, True)),
    **dict.fromkeys(_SAME_MAPS, (_MAP, False)),
    **dict.fromkeys(_SAME_LISTS, (_LIST, False)),
    "prefixItems": (_LIST, True),
    **dict.fromkeys(_PROGRESS_ONE, (_ONE, True)),
    **dict.fromkeys(_SAME_ONE, (_ONE, False)),
}
_NODE_CHECKED = frozenset({"pattern", "enum", *_SAME_LISTS})
"""Keywords `_node_findings` reads besides `type` (checked inline: nearly every node has it)."""


def _text(path: object) -> str:
    """A subschema's place, kept as nested (parent, key) pairs and made text only for a
    message."""
    parts: list[str] = []
    node: object = path
    while isinstance(node, tuple):
        node, key = node
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
    parts.append(str(node))
    return "".join(reversed(parts))[:200]


def _walk(root: dict[str, Any], param: str, where: str, limits: Limits) -> Iterator[Finding]:
    """Depth, widths and types of every subschema, then the loops of `$ref`s."""
    # id(subschema) -> the subschemas reached from it without progress ($ref targets included)
    same: dict[int, list[int]] = {}
    refs: dict[int, str] = {}  # id(subschema) -> its $ref
    anchors: dict[str, object] | None = None  # collected when a "#name" $ref first needs them
    seen: set[int] = set()
    stack: list[tuple[object, int, object]] = [(root, 1, where)]
    too_deep = False
    while stack:
        node, depth, at = stack.pop()
        if type(node) is not dict:
            if not isinstance(node, bool):
                yield _invalid(param, _text(at), "a schema is an object or a boolean")
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        if depth > limits.max_schema_depth and not too_deep:
            too_deep = True
            yield Finding(
                Limit.MAX_SCHEMA_DEPTH,
                param,
                f"{where} nests subschemas more than {limits.max_schema_depth} deep (at "
                f"{_text(at)}); this server accepts at most that for this model (its "
                f"limits.max_schema_depth policy).",
            )
        kind = node.get("type")
        if (kind is not None and not (type(kind) is str and kind in JSON_TYPES)) or (
            not node.keys().isdisjoint(_NODE_CHECKED)
        ):
            yield from _node_findings(node, param, _text(at), limits)
        children: list[int] = []
        ref = node.get("$ref")
        if ref is not None:
            if not isinstance(ref, str):
                yield _invalid(param, _text(at), "$ref must be a string")
            else:
                # Resolved against the whole schema; a target off the keywords is walked too.
                if anchors is None and ref[:2] not in ("#", "#/"):
                    anchors = _anchors(root)
                target = _resolve(root, ref, anchors or {})
                if target is None:
                    yield _invalid(param, _text(at), f"$ref {ref[:80]!r} does not point inside it")
                elif isinstance(target, dict):
                    refs[id(node)] = ref
                    children.append(id(target))
                    stack.append((target, depth, (at, "$ref")))
        for key, value in node.items():
            walk = _KEYWORDS.get(key)
            if walk is None:
                continue
            shape, progress = walk
            if key == "items":  # a schema, or draft 4's list of them
                shape = _LIST if type(value) is list else _ONE
            if shape is _ONE:
                stack.append((value, depth + 1, (at, key)))
                if not progress and type(value) is dict:
                    children.append(id(value))
            elif shape is _MAP:
                if type(value) is not dict:
                    yield _invalid(param, _text((at, key)), f"{key} must be an object of schemas")
                    continue
                here = (at, key)
                stack.extend((v, depth + 1, (here, k)) for k, v in value.items())
                if not progress:
                    children.extend(id(v) for v in value.values() if type(v) is dict)
            else:
                if type(value) is not list:
                    yield _invalid(param, _text((at, key)), f"{key} must be a list of schemas")
                    continue
                here = (at, key)
                stack.extend((v, depth + 1, (here, i)) for i, v in enumerate(value))
                if not progress:
                    children.extend(id(v) for v in value if type(v) is dict)
        if children:
            same[id(node)] = children
    loop = _find_loop(same) if refs else None
    if loop is not None:
        ref_at = refs.get(loop) or next(iter(refs.values()), "#")
        yield Finding(
            Limit.SCHEMA_REF_CYCLE,
            param,
            f"{where} is not accepted: its $ref {ref_at[:80]!r} leads back to itself through "
            "$ref, allOf, anyOf, oneOf or not alone, without a property or an item in "
            "between, so the grammar for it never ends (such a schema crashed vLLM). "
            "Recursion through properties or items is fine.",
        )


def _node_findings(
    node: Mapping[str, Any], param: str, at: str, limits: Limits
) -> Iterator[Finding]:
    kind = node.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        bad = [k for k in kinds if not isinstance(k, str) or k not in JSON_TYPES]
        if bad:
            yield _invalid(
                param,
                at,
                f"type {json.dumps(bad[0])[:40]} is not one of {', '.join(sorted(JSON_TYPES))}",
            )
    pattern = node.get("pattern")
    if pattern is not None and not isinstance(pattern, str):
        yield _invalid(param, at, "pattern must be a string")
    elif isinstance(pattern, str) and len(pattern) > limits.max_regex_chars:
        yield Finding(
            Limit.MAX_REGEX_CHARS,
            param,
            f"{at}.pattern has {len(pattern)} characters; this server accepts at most "
            f"{limits.max_regex_chars} for this model (its limits.max_regex_chars policy).",
        )
    enum = node.get("enum")
    if isinstance(enum, list) and len(enum) > limits.max_schema_enum:
        yield Finding(
            Limit.MAX_SCHEMA_ENUM,
            param,
            f"{at}.enum has {len(enum)} entries; this server accepts at most "
            f"{limits.max_schema_enum} for this model (its limits.max_schema_enum policy).",
        )
    for key in _SAME_LISTS:
        alternatives = node.get(key)
        if isinstance(alternatives, list) and len(alternatives) > limits.max_schema_alternatives:
            yield Finding(
                Limit.MAX_SCHEMA_ALTERNATIVES,
                param,
                f"{at}.{key} has {len(alternatives)} entries; this server accepts at most "
                f"{limits.max_schema_alternatives} for this model (its "
                "limits.max_schema_alternatives policy).",
            )


def _resolve(root: dict[str, Any], ref: str, anchors: Mapping[str, object]) -> object | None:
    """The subschema a local `$ref` points at: "#", "#/json/pointer", or "#anchor"; None when
    it points nowhere in this schema (or outside it)."""
    if not ref.startswith("#"):
        return None
    fragment = unquote(ref[1:])
    if fragment and not fragment.startswith("/"):
        return anchors.get(fragment)
    node: object = root
    for raw in fragment.split("/")[1:]:
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node if isinstance(node, dict | bool) else None


def _anchors(root: object) -> dict[str, object]:
    """Every `$anchor` name in a schema and the subschema that carries it."""
    found: dict[str, object] = {}
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            anchor = node.get("$anchor")
            if isinstance(anchor, str):
                found.setdefault(anchor, node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def _find_loop(edges: Mapping[int, list[int]]) -> int | None:
    """A node on a cycle of `edges` (iterative depth-first search), or None."""
    state: dict[int, int] = {}  # 1: on the current path, 2: done
    for start in edges:
        if start in state:
            continue
        state[start] = 1
        path: list[tuple[int, Iterator[int]]] = [(start, iter(edges.get(start, ())))]
        while path:
            node, successors = path[-1]
            following = next(successors, None)
            if following is None:
                state[node] = 2
                path.pop()
            elif state.get(following) == 1:
                return following
            elif following not in state:
                state[following] = 1
                path.append((following, iter(edges.get(following, ()))))
    return None
