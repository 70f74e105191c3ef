"""What makes two requests "the same" for the quarantine (gateway.isolation.fingerprint):
trivially different copies of a culprit match, different requests do not; and the rule is
versioned."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

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
