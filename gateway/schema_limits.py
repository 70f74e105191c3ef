"""Structured outputs, checked before the grammar compiler sees them.

vLLM reads a constraint from `response_format` (json_schema, json_object, structural_tag),
`structured_outputs` (json, regex, choice, grammar, json_object, structural_tag,
whitespace_pattern), the older `guided_json` / `guided_regex` / `guided_choice` /
`guided_grammar` / `guided_whitespace_pattern` of engines before 0.10, and, when `tool_choice`
is `required` or a named function, `tools[].function.parameters`. Tool parameters are checked
whatever `tool_choice` says: a tool parser may compile them too, and a bad `type` in one
crashed the server (CVE-2025-48944).

Each schema is checked by `gateway.schema_walk` (validity, `$ref` loops, sizes and widths);
here: regex and grammar lengths, choice counts, structural-tag sizes, and the switch that turns
structured outputs off for a model.

Every check yields `Finding`s in the order it meets them, the cheap ones first; the caller
stops at the first one it must act on. Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from gateway.config import Limits
from gateway.limit_names import Finding, Limit
from gateway.schema_walk import json_bytes, schema_findings, too_many_bytes

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
        size = json_bytes(response_format)
        if size > limits.max_schema_bytes:
            yield too_many_bytes("response_format", "response_format", size, limits)


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


__all__ = ["STRUCTURED_FIELDS", "schema_findings", "structured_findings"]
