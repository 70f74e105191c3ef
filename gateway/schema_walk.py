"""One JSON schema, walked once before the grammar compiler sees it (gateway.schema_limits
finds the schemas of a request; this checks each).

The walk is iterative and goes through the keywords that hold subschemas:
- crash class: a `type` that is not a JSON Schema type, a subschema that is neither an object
  nor a boolean, a `$ref` that does not resolve inside the schema (CVE-2025-48942), and a loop
  of `$ref`s that never consumes any input (a segfault of the grammar compiler on vLLM 0.9.2).
  The loop is found in the graph of "no progress" steps: `$ref`, `allOf` / `anyOf` / `oneOf`,
  `not`, `if` / `then` / `else`, `dependentSchemas`. Recursion through `properties`, `items`
  and the other keywords that step into a part of the value is legitimate and stays;
- cost class: bytes of the schema as JSON, nesting of subschemas (deeply nested `oneOf` wedged
  the engine, vllm#54003), entries of one `enum` or of one `oneOf` / `anyOf` / `allOf`, and
  the length of a `pattern`.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import unquote

from gateway.config import Limits
from gateway.limit_names import Finding, Limit

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


def json_bytes(value: object) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def too_many_bytes(param: str, where: str, size: int, limits: Limits) -> Finding:
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
            yield too_many_bytes(param, where, len(schema.encode()), limits)
        try:
            schema = json.loads(schema)
        except ValueError:
            yield _invalid(param, where, "the text is not JSON")
            return
    elif isinstance(schema, dict | list):
        size = json_bytes(schema)
        if size > limits.max_schema_bytes:
            yield too_many_bytes(param, where, size, limits)
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
    return _Walk(root, param, where, limits).run()


class _Walk:
    """One schema's walk: iterative (a schema may be deep), each subschema once."""

    def __init__(self, root: dict[str, Any], param: str, where: str, limits: Limits) -> None:
        self.root, self.param, self.where, self.limits = root, param, where, limits
        # id(subschema) -> subschemas reached from it without progress ($ref targets too)
        self.same: dict[int, list[int]] = {}
        self.refs: dict[int, str] = {}  # id(subschema) -> its $ref
        self.anchors: dict[str, object] | None = None  # made when a "#name" $ref needs them
        self.seen: set[int] = set()
        self.stack: list[tuple[object, int, object]] = [(root, 1, where)]
        self.too_deep = False

    def run(self) -> Iterator[Finding]:
        while self.stack:
            node, depth, at = self.stack.pop()
            if type(node) is not dict:
                if not isinstance(node, bool):
                    yield _invalid(self.param, _text(at), "a schema is an object or a boolean")
                continue
            if id(node) in self.seen:
                continue
            self.seen.add(id(node))
            yield from self._visit(node, depth, at)
        loop = _find_loop(self.same) if self.refs else None
        if loop is not None:
            ref_at = self.refs.get(loop) or next(iter(self.refs.values()), "#")
            yield Finding(
                Limit.SCHEMA_REF_CYCLE,
                self.param,
                f"{self.where} is not accepted: its $ref {ref_at[:80]!r} leads back to itself "
                "through $ref, allOf, anyOf, oneOf or not alone, without a property or an item "
                "in between, so the grammar for it never ends (such a schema crashed vLLM). "
                "Recursion through properties or items is fine.",
            )

    def _visit(self, node: dict[str, Any], depth: int, at: object) -> Iterator[Finding]:
        limits = self.limits
        if depth > limits.max_schema_depth and not self.too_deep:
            self.too_deep = True
            yield Finding(
                Limit.MAX_SCHEMA_DEPTH,
                self.param,
                f"{self.where} nests subschemas more than {limits.max_schema_depth} deep (at "
                f"{_text(at)}); this server accepts at most that for this model (its "
                f"limits.max_schema_depth policy).",
            )
        kind = node.get("type")
        if (kind is not None and not (type(kind) is str and kind in JSON_TYPES)) or (
            not node.keys().isdisjoint(_NODE_CHECKED)
        ):
            yield from _node_findings(node, self.param, _text(at), limits)
        children: list[int] = []
        if "$ref" in node:
            yield from self._ref(node, depth, at, children)
        for key, value in node.items():
            walk = _KEYWORDS.get(key)
            if walk is not None:
                yield from self._keyword(key, value, walk, depth, at, children)
        if children:
            self.same[id(node)] = children

    def _ref(
        self, node: dict[str, Any], depth: int, at: object, children: list[int]
    ) -> Iterator[Finding]:
        """A $ref, resolved against the whole schema; a target off the keywords is walked
        too."""
        ref = node["$ref"]
        if not isinstance(ref, str):
            yield _invalid(self.param, _text(at), "$ref must be a string")
            return
        if self.anchors is None and ref[:2] not in ("#", "#/"):
            self.anchors = _anchors(self.root)
        target = _resolve(self.root, ref, self.anchors or {})
        if target is None:
            yield _invalid(self.param, _text(at), f"$ref {ref[:80]!r} does not point inside it")
        elif isinstance(target, dict):
            self.refs[id(node)] = ref
            children.append(id(target))
            self.stack.append((target, depth, (at, "$ref")))

    def _keyword(
        self,
        key: str,
        value: object,
        walk: tuple[int, bool],
        depth: int,
        at: object,
        children: list[int],
    ) -> Iterator[Finding]:
        """Put a keyword's subschemas on the stack; note those that make no progress."""
        shape, progress = walk
        if key == "items":  # a schema, or draft 4's list of them
            shape = _LIST if type(value) is list else _ONE
        here = (at, key)
        if shape is _ONE:
            self.stack.append((value, depth + 1, here))
            subschemas: list[object] = [value]
        elif shape is _MAP:
            if type(value) is not dict:
                yield _invalid(self.param, _text(here), f"{key} must be an object of schemas")
                return
            self.stack.extend((v, depth + 1, (here, k)) for k, v in value.items())
            subschemas = list(value.values())
        else:
            if type(value) is not list:
                yield _invalid(self.param, _text(here), f"{key} must be a list of schemas")
                return
            self.stack.extend((v, depth + 1, (here, i)) for i, v in enumerate(value))
            subschemas = value
        if not progress:
            children.extend(id(v) for v in subschemas if type(v) is dict)


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
