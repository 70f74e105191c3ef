"""gateway.schema_limits: loops made of $refs alone are refused, recursion through properties
and items stays; invalid schemas are named; every place vLLM reads a constraint is read."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import Limits
from gateway.limit_names import Limit
from gateway.schema_limits import structured_findings
from gateway.schema_walk import schema_findings

LEGIT: list[tuple[str, Any]] = [
    ("recursion through properties", {"type": "object", "properties": {"next": {"$ref": "#"}}}),
    (
        "a tree through items",
        {
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                }
            },
            "$ref": "#/$defs/node",
        },
    ),
    (
        "a linked list through anyOf and properties",
        {
            "definitions": {
                "list": {
                    "anyOf": [
                        {"type": "null"},
                        {"type": "object", "properties": {"tail": {"$ref": "#/definitions/list"}}},
                    ]
                }
            },
            "$ref": "#/definitions/list",
        },
    ),
    (
        "a chain of refs that ends",
        {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {}}, "$ref": "#/$defs/a"},
    ),
    ("escaped pointer", {"$defs": {"a/b": {"type": "string"}}, "$ref": "#/$defs/a~1b"}),
    (
        "an anchor",
        {"$defs": {"x": {"$anchor": "word", "type": "string"}}, "items": {"$ref": "#word"}},
    ),
    ("boolean schemas", {"properties": {"a": True, "b": False}, "additionalProperties": False}),
    ("type lists", {"type": ["string", "null"]}),
]

LOOPS: list[tuple[str, Any]] = [
    ("self", {"$ref": "#"}),
    (
        "two defs",
        {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    ),
    ("through anyOf", {"anyOf": [{"$ref": "#"}, {"type": "null"}]}),
    (
        "through allOf in a def",
        {
            "$defs": {"a": {"allOf": [{"$ref": "#/$defs/a"}]}},
            "properties": {"x": {"$ref": "#/$defs/a"}},
        },
    ),
    ("through not", {"not": {"$ref": "#"}}),
    ("an anchor", {"$anchor": "me", "oneOf": [{"$ref": "#me"}]}),
    ("off the keywords", {"foo": {"$ref": "#/foo"}, "$ref": "#/foo"}),
]


@pytest.mark.parametrize("schema", [pytest.param(s, id=i) for i, s in LEGIT])
def test_legitimate_schemas_pass(schema: Any) -> None:
    """Recursion that consumes input, pointers, anchors and boolean schemas are accepted."""
    assert list(schema_findings(schema, "response_format", "s", Limits())) == []


@pytest.mark.parametrize("schema", [pytest.param(s, id=i) for i, s in LOOPS])
def test_ref_loops_are_refused(schema: Any) -> None:
    """A loop of no-progress steps through a $ref is one finding, schema_ref_cycle."""
    findings = list(schema_findings(schema, "response_format", "s", Limits()))
    assert [f.limit for f in findings] == [Limit.SCHEMA_REF_CYCLE]
    assert "leads back to itself" in findings[0].message


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ({"type": 5}, "type 5"),
        ({"type": ["string", "strng"]}, '"strng"'),
        ({"properties": {"a": "string"}}, "an object or a boolean"),
        ({"properties": []}, "properties must be an object"),
        ({"anyOf": {"type": "string"}}, "anyOf must be a list"),
        ({"pattern": 5}, "pattern must be a string"),
        ({"$ref": 5}, "$ref must be a string"),
        ({"$ref": "https://example.com/s.json"}, "does not point inside"),
        ({"$ref": "#/$defs/missing"}, "does not point inside"),
        ("[1, 2]", "an object or a boolean"),
        ("not json", "not JSON"),
    ],
)
def test_invalid_schemas_are_named(schema: Any, words: str) -> None:
    """What makes a schema invalid is said in the message (crash class: schema_invalid)."""
    findings = list(schema_findings(schema, "tools", "tools[0].function.parameters", Limits()))
    assert findings
    assert findings[0].limit is Limit.SCHEMA_INVALID
    assert words in findings[0].message
    assert findings[0].param == "tools"


def test_every_place_vllm_reads_a_constraint() -> None:
    """response_format, structured_outputs, each guided_* field and every tool's parameters
    are all looked at (here: one loop each)."""
    loop = {"$ref": "#"}
    body = {
        "response_format": {"type": "json_schema", "json_schema": {"schema": loop}},
        "structured_outputs": {"json": loop},
        "guided_json": loop,
        "tools": [
            {"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}},
            {"type": "function", "function": {"name": "b", "parameters": loop}},
        ],
    }
    found = [(f.limit, f.param) for f in structured_findings(body, Limits())]
    assert found == [
        (Limit.SCHEMA_REF_CYCLE, "response_format"),
        (Limit.SCHEMA_REF_CYCLE, "structured_outputs"),
        (Limit.SCHEMA_REF_CYCLE, "guided_json"),
        (Limit.SCHEMA_REF_CYCLE, "tools"),
    ]


def test_a_big_schema_is_still_walked_for_a_loop() -> None:
    """The size finding comes first; the walk goes on, so report mode still sees the loop."""
    schema = {"$ref": "#", "description": "x" * 100}
    found = [f.limit for f in schema_findings(schema, "p", "s", Limits(max_schema_bytes=50))]
    assert found == [Limit.MAX_SCHEMA_BYTES, Limit.SCHEMA_REF_CYCLE]


def test_a_deep_schema_is_reported_once() -> None:
    """Past the depth bound, one finding, not one per level."""
    schema: Any = {"type": "string"}
    for _ in range(100):
        schema = {"items": schema}
    found = [f.limit for f in schema_findings(schema, "p", "s", Limits(max_schema_depth=10))]
    assert found == [Limit.MAX_SCHEMA_DEPTH]
