"""gateway.body's two parsers give one answer: every body `parse_object` reads (orjson first)
parses to the same value, or is refused with the same message, as the standard library's
reference path `parse_stdlib`; and `encode_body` writes what the standard library would mean."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.body import MAX_JSON_DEPTH, encode_body, parse_object, parse_stdlib
from gateway.errors import BadRequest


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """What the gateway reads of a body (`parse_object`'s value, without its flag)."""
    return parse_object(raw)[0]


def _answer(parse: object, raw: bytes) -> tuple[str, str]:
    """A parse's answer as comparable text: the value's exact repr, or the error message."""
    try:
        value = parse(raw)  # type: ignore[operator]
    except BadRequest as err:
        return "error", err.message
    return "value", _exact(value)


def _exact(value: object) -> str:
    """repr that tells 1 from 1.0 and keeps NaN, key order and exact integers."""
    return repr(value)


def _same(raw: bytes) -> None:
    assert _answer(parse_json_object, raw) == _answer(parse_stdlib, raw)


EDGE_BODIES = [
    b'{"a": 123456789012345678901234567890}',
    b'{"a": -123456789012345678901234567890}',
    b'{"a": 18446744073709551615}',
    b'{"a": 18446744073709551616}',
    b'{"a": -9223372036854775808}',
    b'{"a": -9223372036854775809}',
    b'{"a": 9223372036854775807}',
    b'{"a": [1, 2, 99999999999999999999999]}',
    b'{"a": 1e19}',
    b'{"a": 9.3e18}',
    b'{"a": NaN}',
    b'{"a": Infinity, "b": -Infinity}',
    b'{"a": 1e400}',
    b'{"a": 1e-400}',
    b'{"a": -0.0, "b": -0, "c": 0.1, "d": 5e-324, "e": 1.7976931348623157e308}',
    b'{"a": "\\ud800"}',
    b'{"a": "\\udc00x"}',
    b'{"a": "\\ud83d\\ude00"}',
    b'{"\\ud800": 1}',
    b'{"a": "\xed\xa0\x80"}',
    b'{"a": "\xff"}',
    b'\xef\xbb\xbf{"a": 1}',
    b'{"a": 1, "b": 2, "a": 3}',
    b' \t\n{"a": 1}\r\n ',
    b'{"a": 1} x',
    b'{"a": "\x01"}',
    b"[1, 2]",
    b'"text"',
    b"null",
    b"{",
    b'{"a": 1,}',
    b"{'a': 1}",
    b'{"a": 01}',
    b'{"a": .5}',
    b'{"a": 1.}',
    b'{"a": tru}',
    b'{"messages": [{"role": "user", "content": "h\\u00e9llo \\n \\"x\\""}]}',
    '{"a": "héllo ✓ 😀"}'.encode(),
]


@pytest.mark.parametrize("raw", EDGE_BODIES, ids=range(len(EDGE_BODIES)))
def test_edge_bodies(raw: bytes) -> None:
    """Integers past 64 bits, NaN and Infinity, surrogates, BOMs, invalid UTF-8 and malformed
    JSON get the standard library's exact answer."""
    _same(raw)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le"])
def test_utf16_and_utf32(encoding: str) -> None:
    """UTF-16 and UTF-32 bodies (which orjson refuses) are read as before."""
    text = '{"model": "m", "messages": [{"role": "user", "content": "héllo 😀"}], "n": 2}'
    raw = text.encode(encoding)
    _same(raw)
    assert parse_json_object(raw)["messages"][0]["content"] == "héllo 😀"


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1, 600, 1000, 1023, 1030, 5000])
def test_deep_nesting(depth: int) -> None:
    """Bodies nested near and past the depth bound and both parsers' own limits get the
    standard library's answer and message."""
    _same(('{"a":' + "[" * depth + "1" + "]" * depth + "}").encode())
    _same(('{"a":' * depth + "1" + "}" * depth).encode())


@pytest.mark.parametrize("width", [MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1, 1000])
def test_wide_bodies_and_one_deep_branch(width: int) -> None:
    """More lists and objects than the depth bound, side by side, are read by orjson (a body
    of a thousand messages is not deep); one branch among them nested past the bound is
    still refused with the standard library's message."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "x"}]}] * width
    wide = json.dumps({"messages": messages}).encode()
    _same(wide)
    assert parse_object(wide) == (json.loads(wide), True)
    deep = {"messages": messages, "tools": [{"a": 1}]}
    branch: list[dict[str, object]] = deep["tools"]  # type: ignore[assignment]
    for _ in range(MAX_JSON_DEPTH):
        inner: list[dict[str, object]] = [{"a": 1}]
        branch[0]["a"] = inner
        branch = inner
    raw = json.dumps(deep).encode()
    _same(raw)
    with pytest.raises(BadRequest, match="nested more than"):
        parse_object(raw)


@pytest.mark.parametrize(
    ("raw", "finite"),
    [
        (b'{"a": 1, "b": [0.5, -0.0, 9.2e18, 5e-324]}', True),
        (b'{"a": 1e400}', False),
        (b'{"a": 18446744073709551616}', False),
        ('{"a": 1}'.encode("utf-16"), False),
    ],
)
def test_a_body_is_said_finite_only_when_orjson_read_it(raw: bytes, finite: bool) -> None:
    """The flag that lets `encode_body` skip its walk: true for what orjson read, false for
    the standard library's bodies (which may hold an infinity: 1e400)."""
    body, said = parse_object(raw)
    assert said is finite
    assert encode_body(body, finite=said) == encode_body(body)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=5))
def test_random_objects(value: dict[str, object]) -> None:
    """Random objects (exact big integers, extreme floats, any text) written by the standard
    library, with and without ASCII escapes, read the same by both paths."""
    for ensure_ascii in (True, False):
        try:
            raw = json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")
        except UnicodeEncodeError:
            continue
        _same(raw)
        try:
            body, finite = parse_object(raw)
        except BadRequest:
            continue
        if finite:  # encoded without the walk for NaN and infinities: the same bytes
            assert encode_body(body, finite=True) == encode_body(body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 60))
def test_spliced_bytes(junk: bytes, at: int) -> None:
    """Random bytes spliced into a valid body get the same answer from both paths."""
    valid = b'{"model": "m", "messages": [{"role": "user", "content": "Hello 12345"}]}'
    _same(valid[:at] + junk + valid[at:])


def _meaning(raw: bytes) -> str:
    return repr(json.loads(raw))


@pytest.mark.parametrize(
    "value",
    [
        {"a": math.nan, "b": [math.inf, -math.inf]},
        {"a": 2**64, "b": -(2**63) - 1, "c": 2**200},
        {"a": 1e16, "b": 0.1, "c": -0.0, "d": 5e-324},
        {"a": 'héllo ✓ 😀 \u2028 \x00 "\\'},
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 16},
    ],
)
def test_encode_body_means_what_stdlib_writes(value: dict[str, object]) -> None:
    """The engine reads the encoded body as the standard library's encoding: NaN stays NaN
    (orjson would write null), integers past 64 bits stay exact."""
    expected = json.dumps(value, ensure_ascii=False).encode()
    assert _meaning(encode_body(value)) == _meaning(expected)


def test_encode_body_refuses_lone_surrogates_as_before() -> None:
    """A lone surrogate (only a resumed stream's text could hold one) fails as it did."""
    with pytest.raises(UnicodeEncodeError):
        encode_body({"a": "\ud800"})
