"""The client's JSON body, read and checked before anything else looks at it: a JSON object of
valid UTF-8 text, not nested past `MAX_JSON_DEPTH`, without lone surrogates; else a 4xx that
says what is wrong. And the admitted body encoded again for the engine (`encode_body`).

Two parsers, one answer. orjson parses the common body (strict UTF-8 JSON) several times faster
than the standard library; whatever orjson refuses (NaN and Infinity literals, numbers past a
double, lone surrogate escapes, a BOM, UTF-16 and UTF-32 bodies, invalid UTF-8, deep nesting)
goes to the standard library's path, which accepts or refuses it and words the error exactly as
before. orjson turns an integer outside 64 bits into a float instead of refusing it; a parse
that holds a float of 2**63 or more is therefore parsed again by the standard library, which
keeps the exact integer."""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

import orjson
from aiohttp import web

from gateway.errors import BadRequest, RequestTimeout, UnsupportedMediaType
from gateway.keys import CONFIG

_JSON_TYPES = frozenset({"application/json", ""})
MAX_JSON_DEPTH = 128
"""Deepest nesting of lists and objects accepted in a generation body. Python's JSON parser
(the engine's too) fails near 1,000 levels, and an engine that answers a bare 500 is settled as
a possible engine failure; tool schemas and messages nest a few dozen levels at most."""
# A JSON escape of a UTF-16 surrogate; the parsed text may then hold one without its pair.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


async def read_json_object(request: web.Request) -> tuple[dict[str, Any], bool]:
    """The body as a JSON object, and whether every number in it is finite (see
    `parse_object`); or a 4xx saying what is wrong with it. The size bound is the app's
    client_max_size (413 past it)."""
    if request.content_type not in _JSON_TYPES and not request.content_type.endswith("+json"):
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, not {request.content_type!r}."
        )
    return parse_object(await read_body(request))


def parse_object(raw: bytes) -> tuple[dict[str, Any], bool]:
    """A body's bytes as a JSON object, or the BadRequest saying what is wrong with them; and
    whether the body is known to hold no NaN or infinity: true when orjson read it (it refuses
    those literals and numbers past a double), so that `encode_body(..., finite=True)` need not
    look for them."""
    if not raw:
        raise BadRequest("The request body is empty; a JSON object is required.")
    fast = _fast_parse(raw)
    if fast is not None:
        return fast, True  # orjson refuses lone surrogate escapes: none to look for
    # Refused by orjson, or too deep: the standard library's path decides and words the error.
    return parse_stdlib(raw), False


def _fast_parse(raw: bytes) -> dict[str, Any] | None:
    """The body parsed by orjson when it is a JSON object that orjson reads exactly as the
    standard library does, nested at most MAX_JSON_DEPTH deep; None for the standard
    library's path to decide."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(value, dict):
        return None
    containers = _containers_unless_big_float(value)
    if containers is None or (containers > MAX_JSON_DEPTH and _too_deep(value)):
        return None
    return value


_INT64_FLOAT = float(2**63)
"""orjson parses an integer past 64 bits (below -2**63 or above 2**64-1) as a float of at least
this magnitude."""


def _containers_unless_big_float(value: object) -> int | None:
    """In one walk of a parsed value: None when it holds a float of magnitude 2**63 or more
    (perhaps an integer literal that orjson could not keep exact), else how many lists and
    objects it holds, which bounds how deep they nest (most bodies hold a few: no depth walk)."""
    stack = [value]
    containers = 0
    while stack:
        item = stack.pop()
        if type(item) is dict:
            containers += 1
            stack.extend(item.values())
        elif type(item) is list:
            containers += 1
            stack.extend(item)
        elif type(item) is float and not math.fabs(item) < _INT64_FLOAT:
            return None
    return containers


def parse_stdlib(raw: bytes) -> dict[str, Any]:
    """The standard library's parse, with the checks of a body it accepts (what
    `parse_object` answers for every body; the reference its tests compare with)."""
    try:
        # Strictly decoded: json.loads(bytes) would let UTF-8-encoded surrogates through.
        text = raw.decode(json.detect_encoding(raw))
        body = json.loads(text, parse_constant=_NonFinite)
    except UnicodeDecodeError:
        raise BadRequest("The request body is not valid UTF-8.") from None
    except RecursionError:
        raise BadRequest("The request body is nested too deeply.") from None
    except ValueError as err:
        raise BadRequest(f"The request body is not valid JSON: {err}.") from None
    if not isinstance(body, dict):
        raise BadRequest(f"The request body must be a JSON object, not {type(body).__name__}.")
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _too_deep(body):
        raise BadRequest(f"The request body is nested more than {MAX_JSON_DEPTH} levels deep.")
    where = _non_finite_at(body) if _NON_FINITE.search(text) else None
    if where is not None:
        path, literal = where
        raise BadRequest(
            f"The request body holds {literal} at `{path}`: NaN and Infinity are not JSON numbers.",
            param=path,
        )
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(body):
        raise BadRequest(
            "The request body holds an unpaired UTF-16 surrogate escape "
            "(\\ud800-\\udfff): that is not valid Unicode text."
        )
    return body


def encode_body(body: object, *, finite: bool = False) -> bytes:
    """A parsed (and rewritten) body as JSON bytes for the engine: orjson when it encodes the
    value as the standard library would (no NaN or Infinity, which orjson writes as null; no
    integer past 64 bits, which it refuses), else the standard library (NaN literals kept).
    `finite`: the caller knows there is no NaN or infinity (`parse_object` said so of the body
    this one was made from), so the body is not walked to look for one."""
    if finite or not _has_nonfinite(body):
        try:
            return orjson.dumps(body)
        except TypeError:  # an integer past 64 bits, a lone surrogate
            pass
    return json.dumps(body, ensure_ascii=False).encode()


def _has_nonfinite(value: object) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is str or kind is int:  # most of a body: decided by one type check
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):  # the tuple form: faster than a union
            stack.extend(item)
    return False


class _NonFinite(str):
    """A NaN, Infinity or -Infinity literal as parsed (Python's parser accepts them)."""

    __slots__ = ()


_NON_FINITE = re.compile(r"NaN|Infinity")


def _non_finite_at(value: object) -> tuple[str, str] | None:
    """Where (a dotted path, list items as [i]) the first NaN or Infinity literal of a
    parsed body is, and which; None without one."""
    stack: list[tuple[object, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, _NonFinite):
            return path or "(body)", str(item)
        if isinstance(item, dict):
            stack.extend((v, f"{path}.{k}" if path else str(k)) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(item))
    return None


async def read_body(request: web.Request) -> bytes:
    """The whole body, sent within `server.body_timeout_s` (408 past it, and the connection
    closes); the size bound is the app's client_max_size (413)."""
    content = request.content
    if content.is_eof():  # all of it arrived with the head: taken as it is, bound checked
        raw = content.read_nowait(-1)
        if len(raw) > request.client_max_size:  # as `request.read()` refuses it
            raise web.HTTPRequestEntityTooLarge(request.client_max_size, len(raw))
        return raw
    timeout = request.app[CONFIG].current.server.body_timeout_s
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        raise RequestTimeout(f"The request body was not received within {timeout:g} s.") from None


def _too_deep(value: object) -> bool:
    """Whether a parsed JSON value nests lists and objects more than MAX_JSON_DEPTH deep."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_JSON_DEPTH:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _has_lone_surrogate(value: object) -> bool:
    """Whether any string (key or value) in a parsed JSON value holds a lone surrogate, which
    no UTF-8 encoder, tokenizer or engine accepts. Iterative: the value may be deep."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False
