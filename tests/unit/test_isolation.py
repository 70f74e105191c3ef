"""Attribution and quarantine as pure state: fingerprints, expiry, bounds, blame rules."""

from __future__ import annotations

import pytest

from gateway.config import IsolationConfig
from gateway.isolation import (
    InFlightRequest,
    Quarantine,
    SuspectBook,
    attribute_failure,
    fingerprint,
)

IGNORE = IsolationConfig().fingerprint_ignore_set


def test_fingerprint_ignores_fields_that_vary_between_retries() -> None:
    """user, stream, stream_options and request ids do not change the fingerprint; key order
    does not either; the prompt and sampling fields do."""
    base = {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0}
    retry = {
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "u2",
        "request_id": "r",
        "messages": base["messages"],
        "model": "m",
    }
    assert fingerprint(base, IGNORE) == fingerprint(retry, IGNORE)
    assert fingerprint(base, IGNORE) != fingerprint({**base, "temperature": 1}, IGNORE)
    other = {**base, "messages": [{"role": "user", "content": "y"}]}
    assert fingerprint(base, IGNORE) != fingerprint(other, IGNORE)


def test_quarantine_expires_and_is_bounded() -> None:
    """Entries vanish after their TTL and the oldest goes first past max_entries."""
    q = Quarantine(ttl_s=10, max_entries=2)
    q.add("a", "m", "why", 1, now=0)
    q.add("b", "m", "why", 1, now=1)
    q.add("c", "m", "why", 1, now=2)
    assert q.get("a", now=3) is None
    assert q.get("b", now=3) is not None
    assert q.get("b", now=11.5) is None
    assert [e.fingerprint for e in q.entries(now=11.5)] == ["c"]
    assert q.clear() == 1


def test_public_entry_never_holds_the_prompt() -> None:
    """What the operator lists is fingerprint, model, times, reason: no body text."""
    q = Quarantine(ttl_s=10, max_entries=5)
    entry = q.add("fp", "tiny", "engine died", 2, now=100)
    assert set(entry.public()) == {
        "fingerprint",
        "model",
        "since",
        "until",
        "reason",
        "failures",
        "found_by",
    }
    assert entry.public()["until"] == 110


@pytest.mark.parametrize(
    ("rounds", "threshold", "quarantined_after"),
    [
        (1, 2, None),
        (2, 2, 2),
        (3, 3, 3),
        (1, 1, 1),
    ],
)
def test_in_flight_at_repeated_failures_is_quarantined(
    rounds: int, threshold: int, quarantined_after: int | None
) -> None:
    """Without probation a fingerprint is quarantined once it was in flight at
    `suspect_failures` failures, and stays a suspect before that."""
    book = SuspectBook(ttl_s=100, max_entries=10)
    seen_at = None
    for i in range(1, rounds + 1):
        verdict = attribute_failure(
            [InFlightRequest("fp", "m", False), InFlightRequest("other", "m", False)]
            if i == 1
            else [InFlightRequest("fp", "m", False)],
            book,
            threshold,
            now=i,
        )
        if verdict.quarantine and seen_at is None:
            seen_at = i
    assert seen_at == quarantined_after
    if quarantined_after is None:
        assert book.is_suspect("fp", now=rounds)


def test_solo_run_is_the_culprit_outright() -> None:
    """A failure while a suspect ran alone blames it at once, whatever the threshold."""
    book = SuspectBook(ttl_s=100, max_entries=10)
    verdict = attribute_failure([InFlightRequest("fp", "m", True)], book, suspect_failures=5, now=1)
    assert [q.fingerprint for q in verdict.quarantine] == ["fp"]
    assert "alone on probation" in verdict.quarantine[0].reason


def test_suspicion_fades_after_its_ttl() -> None:
    """A fingerprint not seen failing for longer than the TTL is no longer a suspect, and a
    new failure starts its count again."""
    book = SuspectBook(ttl_s=10, max_entries=10)
    attribute_failure([InFlightRequest("fp", "m", False)], book, suspect_failures=2, now=0)
    assert book.is_suspect("fp", now=5)
    assert not book.is_suspect("fp", now=20)
    verdict = attribute_failure(
        [InFlightRequest("fp", "m", False)], book, suspect_failures=2, now=21
    )
    assert verdict.quarantine == ()
