"""What makes two requests "the same" for the quarantine (gateway.isolation.fingerprint):
trivially different copies of a culprit match, different requests do not; and the rule is
versioned."""

from __future__ import annotations

import copy
import random
import struct
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from gateway import isolation
from gateway.isolation import FINGERPRINT_VERSION, fingerprint

IGNORE = frozenset({"user", "stream", "stream_options", "request_id", "metadata"})


def _chat(content: Any = "please kill the engine now", **extra: Any) -> dict[str, Any]:
    return {
        "model": "tiny",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": content},
        ],
        "max_tokens": 20,
        "temperature": 0,
        **extra,
    }


def _fp(body: dict[str, Any]) -> str:
    return fingerprint(body, IGNORE)


def _edit(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    body = copy.deepcopy(_chat())
    change(body)
    return body


def _set_content(text: str) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        body["messages"][1]["content"] = text

    return change


SAME = {
    "a trailing space": _set_content("please kill the engine now "),
    "leading whitespace": _set_content("\n\t please kill the engine now"),
    "a double space": _set_content("please  kill the engine now"),
    "a tab for a space": _set_content("please\tkill the engine now"),
    "a newline for a space": _set_content("please kill\nthe engine now"),
    "CRLF and NBSP": _set_content("please\r\nkill\u00a0the engine now"),
    "key order": lambda b: b.update(dict(reversed(list(b.items())))),
    "message key order": lambda b: b["messages"].__setitem__(
        1, {"content": b["messages"][1]["content"], "role": "user"}
    ),
    "an ignored field": lambda b: b.update(user="someone-else", stream=True),
    "an explicit null": lambda b: b.update(top_p=None),
    "a null inside a message": lambda b: b["messages"][1].update(name=None),
    "a float written as integer": lambda b: b.update(temperature=0.0),
}


@pytest.mark.parametrize("change", SAME.values(), ids=SAME.keys())
def test_trivially_different_copies_are_the_same(change: Callable[[dict[str, Any]], None]) -> None:
    """A culprit resent with whitespace changed inside its text, keys reordered, ignored
    fields or explicit nulls added, or a whole number written as a float, matches."""
    assert _fp(_edit(change)) == _fp(_chat())


def test_text_parts_are_read_like_text() -> None:
    """Whitespace inside a content part's text is read the same way as in a plain string."""
    parts = [{"type": "text", "text": "please kill  the engine now "}]
    trimmed = [{"type": "text", "text": "please kill the engine now"}]
    assert _fp(_chat(parts)) == _fp(_chat(trimmed))


DISTINCT = {
    "another word": _set_content("please kill the engine later"),
    "letter case": _set_content("Please kill the engine now"),
    "punctuation": _set_content("please kill the engine now."),
    "a space inside a word": _set_content("please kill the en gine now"),
    "a removed space": _set_content("pleasekill the engine now"),
    "another role": lambda b: b["messages"][1].update(role="assistant"),
    "messages reordered": lambda b: b["messages"].reverse(),
    "one more message": lambda b: b["messages"].append({"role": "user", "content": "again"}),
    "max_tokens": lambda b: b.update(max_tokens=21),
    "temperature": lambda b: b.update(temperature=0.5),
    "model": lambda b: b.update(model="other"),
    "a new parameter": lambda b: b.update(top_p=0.9),
    "an empty string for null": lambda b: b["messages"][1].update(name=""),
    "a stop sequence": lambda b: b.update(stop=["\n"]),
}


@pytest.mark.parametrize("change", DISTINCT.values(), ids=DISTINCT.keys())
def test_different_requests_stay_distinct(change: Callable[[dict[str, Any]], None]) -> None:
    """Different words, case, punctuation, roles, message order, model or parameter values
    make a different request: it is not refused for another's culprit."""
    assert _fp(_edit(change)) != _fp(_chat())


def test_prompts_of_completions_are_read_the_same_way() -> None:
    """A completion prompt (or a list of them) is normalised like chat text, and the order of
    prompts in a list still counts."""
    base = {"model": "tiny", "prompt": ["one two", "three"], "max_tokens": 4}
    spaced = {**base, "prompt": [" one   two\n", "three "]}
    swapped = {**base, "prompt": ["three", "one two"]}
    assert _fp(base) == _fp(spaced)
    assert _fp(base) != _fp(swapped)


def test_the_fingerprint_is_versioned() -> None:
    """The default rule is FINGERPRINT_VERSION (2); version 1 is still computed exactly as
    before (the exact body), so entries written by replicas that run it can be looked up; the
    two versions never give the same fingerprint; an unknown version is an error."""
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "please POISON now"}],
        "max_tokens": 20,
        "user": "u",
    }
    assert FINGERPRINT_VERSION == 2
    assert fingerprint(body, frozenset({"user"})) == fingerprint(
        body, frozenset({"user"}), version=2
    )
    # The value the gateway computed before versions existed, for this body.
    assert fingerprint(body, frozenset({"user"}), version=1) == "fd354ef968d4d2f2eb1c159fe6b1a2c4"
    assert fingerprint(body, frozenset({"user"}), version=1) != fingerprint(
        body, frozenset({"user"})
    )
    spaced = {**body, "messages": [{"role": "user", "content": "please POISON now "}]}
    assert fingerprint(spaced, frozenset({"user"}), version=1) != fingerprint(
        body, frozenset({"user"}), version=1
    )
    with pytest.raises(ValueError, match="unknown fingerprint version"):
        fingerprint(body, frozenset(), version=3)


@pytest.mark.parametrize(
    "text",
    [
        "ab " * 30000,  # long: the regex pass
        " a\t\tb\n\u00a0c \u2003 d\x1c",
        ("line of text\n\n" * 6000) + "  end ",
    ],
)
def test_long_and_short_strings_normalise_alike(text: str) -> None:
    """A string past the split threshold is read by the regex pass exactly as split and join
    read it (the two paths of version 2 agree, whitespace of every kind included)."""
    body = {"model": "m", "prompt": text}
    short = {"model": "m", "prompt": " ".join(text.split())}
    assert fingerprint(body, frozenset()) == fingerprint(short, frozenset())


# Bodies whose version 2 fingerprints were computed by the standard-library writer alone
# (before orjson wrote the canonical form): a changed value here breaks every quarantine
# shared with replicas that run the earlier code.
V2_KNOWN = [
    (
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "please POISON now"}],
            "max_tokens": 20,
            "user": "u",
        },
        "a0ab56e843537480f9e75e7f274658a2",
    ),
    (
        {
            "model": "tiny",
            "messages": [
                {"role": "system", "content": " Be\tterse.\n"},
                {"role": "user", "content": [{"type": "text", "text": "a  b"}]},
            ],
            "temperature": 0.7,
            "top_p": 1.0,
            "logit_bias": {"12": -1.5e-7},
            "seed": 2**70,
            "stop": ["\u2028", '\x00"\\'],
            "presence_penalty": None,
        },
        "56760ab743dceba9ee46e25ade0d3179",
    ),
    (
        {
            "model": "m",
            "prompt": ["one", "two \U0001f600 \ud800"],
            "max_tokens": 1e16,
            "min_p": 1.234e-05,
        },
        "31fad0ae69f84c7f2858fcb679dc752a",
    ),
    (
        {
            "model": "tiny",
            "prompt": "caf\u00e9 x",
            "temperature": 0.7,
            "min_p": 1.5e-07,
            "top_p": 0.95,
            "n": 1.0,
        },
        "561b2f53c9a3f2b5f531fc31886ad976",
    ),
]


@pytest.mark.parametrize(("body", "expected"), V2_KNOWN)
def test_version_2_values_are_unchanged(body: dict[str, Any], expected: str) -> None:
    """Version 2 gives the same value as when the standard library wrote every canonical form
    (small floats, integers past 64 bits, lone surrogates and control characters included)."""
    assert fingerprint(body, frozenset({"user"})) == expected


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.choice([0, 1, -1, 2**63 - 1, -(2**63), 2**64 - 1, rng.randrange(-1000, 1000)])
    if kind == 1:
        return struct.unpack("d", rng.randbytes(8))[0]
    if kind == 2:
        return rng.choice([0.5, 1e-4, 9.99e-5, 1e-7, 1e16, 1e22, -0.0, 123.456, 1.0, 2.0**60])
    if kind == 3:
        return "".join(chr(rng.choice(_CODEPOINTS)) for _ in range(rng.randrange(12)))
    if kind == 4:
        return rng.choice([True, False, None])
    if kind == 5:
        return rng.choice(["", " ", "a b", "\u00e9t\u00e9", "\U0001f642 x", "\t\n"])
    if kind in (6, 7):
        return {
            "".join(chr(rng.choice(_CODEPOINTS)) for _ in range(rng.randrange(1, 5))): (
                _random_value(rng, depth + 1)
            )
            for _ in range(rng.randrange(5))
        }
    return [_random_value(rng, depth + 1) for _ in range(rng.randrange(5))]


_CODEPOINTS = [
    *range(0x80),
    0x85,
    0xA0,
    0xE9,
    0x2003,
    0x2028,
    0x2029,
    0x3000,
    0xFEFF,
    0x1F642,
]


def test_orjson_and_the_standard_library_write_the_same_canonical_bytes() -> None:
    """On random JSON values (floats of every magnitude, 64-bit integers, control and Unicode
    space characters, nested objects), the fast canonical form (orjson) is byte for byte the
    standard library's, or the fast path declines the value: version 2 never depends on which
    writer ran."""
    rng = random.Random(1234)
    fast_taken = 0
    for _ in range(3000):
        value = {"v": _random_value(rng)}
        try:
            fast = orjson.dumps(isolation._normalised(value), option=orjson.OPT_SORT_KEYS)
        except (isolation._OrjsonWritesOtherwise, orjson.JSONEncodeError):
            continue
        fast_taken += 1
        assert fast == isolation._canonical_std(isolation._normalised(value, strict=False))
    assert fast_taken > 1500  # the fast path is the common one


def test_the_space_table_is_pythons() -> None:
    """The characters version 2 reads as spaces are exactly those `str.isspace` accepts."""
    expected = {chr(c) for c in range(0x110000) if chr(c).isspace()} - {" "}
    assert set(isolation._OTHER_SPACE) == expected


def test_the_short_texts_single_read_refuses_every_other_space() -> None:
    """`str.isprintable`, which reads a short text once, is false for every character version 2
    reads as a space but the space itself."""
    assert " ".isprintable()
    assert not any(c.isprintable() for c in isolation._OTHER_SPACE)


def test_plain_is_split_and_join_on_random_text() -> None:
    """On random short and long text, ASCII or not (Latin-1, astral), with every kind of space,
    runs of them, at the ends or inside, either side of the lengths where the reading changes,
    the quick reading agrees with its definition: already the text split and join would make."""
    rng = random.Random(99)
    ascii_spaces = [c for c in isolation._OTHER_SPACE if c.isascii()]
    other_spaces = [c for c in isolation._OTHER_SPACE if not c.isascii()]
    ascii_only = (["a", "b", " ", "  ", *ascii_spaces], [30, 30, 20, 1, *[0.05] * 9])
    mixed = (
        [*ascii_only[0], "\u00e9", "\U0001f642", "\u4e2d", *other_spaces],
        [*ascii_only[1], 3, 3, 3, *[0.05] * len(other_spaces)],
    )
    edges = (isolation._SCAN_ASCII_FROM, isolation._SCAN_FROM)
    sizes = [1, 3, 40, *(edge + d for edge in edges for d in (-1, 0))]
    plain_seen = 0
    for _ in range(4000):
        size = rng.choice(sizes)
        pieces, weights = rng.choice([ascii_only, mixed])
        text = "".join(rng.choices(pieces, weights, k=size))[:size]
        expected = text == " ".join(text.split())
        assert isolation._plain(text) is expected, repr(text)
        plain_seen += expected
    assert 400 < plain_seen < 3600  # both answers are well represented


@pytest.mark.parametrize(
    "text",
    ["caf\u00e9 au lait", "caf\u00e9\u00a0au lait", "caf\u00e9 au lait\u3000", "\U0001f642  x"],
)
def test_non_ascii_text_is_read_like_split_and_join(text: str) -> None:
    """Non-ASCII text already in version 2's form skips the split; text that is not is
    normalised: either way the fingerprint is that of split and join."""
    body = {"model": "m", "prompt": text}
    assert fingerprint(body, frozenset()) == fingerprint(
        {"model": "m", "prompt": " ".join(text.split())}, frozenset()
    )


class _Text(str):
    __slots__ = ()


class _Number(float):
    __slots__ = ()


def test_subclasses_of_json_types_read_like_the_types() -> None:
    """A body built from subclasses (an OrderedDict, a str and a float subclass: what a caller
    other than the body parser may pass) has the fingerprint of the same plain body, whichever
    writer the canonical form takes."""
    plain = {"model": "m", "prompt": "a b", "temperature": 0.5, "min_p": 1e-05}
    odd = OrderedDict(
        [
            ("min_p", _Number(1e-05)),
            ("temperature", _Number(0.5)),
            ("prompt", _Text(" a\tb ")),
            ("model", _Text("m")),
        ]
    )
    assert fingerprint(odd, frozenset()) == fingerprint(plain, frozenset())
    assert fingerprint({**odd, "min_p": 1e-05}, frozenset()) == fingerprint(plain, frozenset())


def test_a_body_in_normal_form_is_written_as_it_is() -> None:
    """The fingerprint writes a body without copying it when `_in_normal_form` says the copy
    would change nothing: on random JSON values, every one it says so of is equal to its
    normalised copy and written to the same canonical bytes, and it says so often."""
    rng = random.Random(4321)
    taken = 0
    for _ in range(4000):
        value = {"v": _random_value(rng), "w": _random_value(rng)}
        if not isolation._in_normal_form(value):
            continue
        taken += 1
        normalised = isolation._normalised(value)  # strict: would raise for a tiny float
        assert normalised == value
        assert orjson.dumps(value, option=orjson.OPT_SORT_KEYS) == orjson.dumps(
            normalised, option=orjson.OPT_SORT_KEYS
        )
    assert taken > 400
