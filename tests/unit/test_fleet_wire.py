"""The pure part of the shared quarantine: key names, entry and message encoding, unsent
changes, reconciling after a reconnect, and the `isolation.shared` config."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.config import ConfigError, parse_config
from gateway.fleet_wire import (
    AddOp,
    ChargeOp,
    FleetKeys,
    Pending,
    Quarantined,
    Released,
    ReleaseOp,
    Suspected,
    decode_entry,
    decode_message,
    encode_entry,
    encode_message,
    ms,
    reconcile,
)
from gateway.isolation import FINGERPRINT_VERSION, Quarantine, QuarantineEntry, SuspectBook


def _entry(fp: str = "fp", since: float = 100.0, *, proven: bool = True) -> QuarantineEntry:
    return QuarantineEntry(fp, "tiny", since, since + 60, "alone on probation", 1, proven, "a")


def test_keys_carry_the_prefix_and_the_fingerprint_version() -> None:
    """Every key and the channel sit under `<prefix>:v<version>`: a replica hashing requests
    differently never reads another version's entries."""
    keys = FleetKeys.of("prod", FINGERPRINT_VERSION)
    base = f"prod:v{FINGERPRINT_VERSION}"
    names = [
        keys.index,
        keys.entry("f"),
        keys.released("f"),
        keys.released_all,
        keys.suspicion("f"),
        keys.suspects,
        keys.channel,
    ]
    assert all(name.startswith(base + ":") for name in names)
    assert len(set(names)) == len(names)
    assert keys.entry("f") == keys.entry_prefix + "f"
    assert keys.released("f") == keys.released_prefix + "f"
    assert FleetKeys.of("prod", FINGERPRINT_VERSION + 1).index != keys.index


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(1.0, 1000), (0.0001, 1), (0.0, 1), (2.5004, 2501)],
)
def test_ms_rounds_up_and_is_never_zero(seconds: float, expected: int) -> None:
    """A TTL in milliseconds is rounded up and never 0 (PX 0 is an error in Redis)."""
    assert ms(seconds) == expected


def test_an_entry_survives_the_round_trip() -> None:
    """What one replica writes, another reads back as the same entry, marked proven."""
    entry = _entry()
    assert decode_entry(json.dumps(encode_entry(entry))) == entry


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[]",
        "{}",
        json.dumps({**encode_entry(_entry()), "since": "yesterday"}),
        json.dumps({**encode_entry(_entry()), "until": True}),
        json.dumps({**encode_entry(_entry()), "fingerprint": ""}),
        json.dumps({**encode_entry(_entry()), "model": 3}),
        json.dumps({**encode_entry(_entry()), "failures": 1.5}),
        json.dumps({**encode_entry(_entry()), "found_by": ["a"]}),
        '{"fingerprint":"f","model":null,"since":NaN,"until":1,"reason":"r","failures":1}',
    ],
)
def test_a_malformed_entry_is_ignored(raw: str) -> None:
    """Anything that is not an entry (another program's key, a bad write) reads as None."""
    assert decode_entry(raw) is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            encode_message("quarantine", "b/1", entry=encode_entry(_entry())),
            Quarantined(_entry()),
        ),
        (encode_message("release", "b/1", fingerprint="fp"), Released("fp")),
        (encode_message("release_all", "b/1"), Released(None)),
        (
            encode_message("suspect", "b/1", fingerprint="fp", model="tiny", failures=2),
            Suspected("fp", "tiny", 2),
        ),
        (
            encode_message("suspect", "b/1", fingerprint="fp", failures=3),
            Suspected("fp", None, 3),
        ),
        (encode_message("release", "a/1", fingerprint="fp"), None),  # our own
        (encode_message("release", "b/1"), None),
        (encode_message("suspect", "b/1", fingerprint="fp", failures="2"), None),
        (encode_message("quarantine", "b/1", entry={"fingerprint": "fp"}), None),
        (encode_message("explode", "b/1", fingerprint="fp"), None),
        ("garbage", None),
        ("[1, 2]", None),
    ],
)
def test_messages_decode_to_what_they_say(raw: str, expected: Any) -> None:
    """Each event decodes to its meaning; this process's own, unknown and malformed events
    are ignored."""
    assert decode_message(raw, "a/1") == expected


def test_pending_keeps_order_and_the_last_word_per_entry() -> None:
    """Unsent changes go out oldest first; a release replaces an unsent add of the same
    fingerprint (and the other way round)."""
    pending = Pending(10)
    first, second = AddOp(_entry("x")), AddOp(_entry("y"))
    pending.push(first)
    pending.push(second)
    release = ReleaseOp("x", 1.0)
    pending.push(release)
    assert pending.peek() is second
    pending.pop(second)
    assert pending.peek() is release
    assert len(pending) == 1


def test_pending_clear_all_drops_earlier_entries_but_keeps_charges() -> None:
    """A clear of everything makes earlier adds and releases moot; suspicion counts stay."""
    pending = Pending(10)
    charge = ChargeOp("s", "tiny")
    pending.push(AddOp(_entry("x")))
    pending.push(charge)
    pending.push(ReleaseOp("y", 1.0))
    clear = ReleaseOp(None, 2.0)
    pending.push(clear)
    assert len(pending) == 2
    assert pending.peek() is charge
    pending.pop(charge)
    assert pending.peek() is clear


def test_pending_is_bounded_and_counts_what_it_gave_up() -> None:
    """Past its bound the oldest unsent change is given up (and counted)."""
    pending = Pending(2)
    for fp in ("a", "b", "c"):
        pending.push(ChargeOp(fp, None))
    assert len(pending) == 2
    assert pending.dropped == 1
    head = pending.peek()
    assert isinstance(head, ChargeOp)
    assert head.fingerprint == "b"


def test_pending_pop_ignores_an_op_that_is_no_longer_first() -> None:
    """An op sent while a newer push reshaped the queue is not popped by mistake."""
    pending = Pending(10)
    add = AddOp(_entry("x"))
    pending.push(add)
    pending.push(ReleaseOp(None, 1.0))
    pending.pop(add)
    assert len(pending) == 1


@pytest.mark.parametrize(
    ("entry", "remote", "tombstone", "released_all_ms", "forget", "republish"),
    [
        (_entry("x"), {}, False, None, (), ("x",)),  # Redis lost it: send again
        (_entry("x"), {}, True, None, ("x",), ()),  # cleared elsewhere meanwhile
        (_entry("x", since=100), {}, False, 100_000, ("x",), ()),  # all cleared after it
        (_entry("x", since=100), {}, False, 99_999, (), ("x",)),  # cleared before it
        (_entry("x"), {"x": _entry("x")}, False, None, (), ()),  # Redis has it
        (_entry("x", proven=False), {}, True, None, (), ()),  # this replica's own
    ],
)
def test_reconcile_after_a_reconnect(
    entry: QuarantineEntry,
    remote: dict[str, QuarantineEntry],
    tombstone: bool,
    released_all_ms: int | None,
    forget: tuple[str, ...],
    republish: tuple[str, ...],
) -> None:
    """A proven local entry Redis lacks is forgotten when it was released meanwhile, else sent
    again; entries found by count alone are never touched."""
    plan = reconcile([entry], remote, {entry.fingerprint: tombstone}, released_all_ms)
    assert plan.forget == forget
    assert tuple(e.fingerprint for e in plan.republish) == republish


class Recorder:
    """A listener that records what the quarantine and the suspect book tell it."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def quarantined(self, entry: QuarantineEntry) -> None:
        self.events.append(("quarantined", entry.fingerprint))

    def released(self, fp: str | None) -> None:
        self.events.append(("released", fp))

    def charged(self, fp: str, model: str | None) -> None:
        self.events.append(("charged", fp))


def test_the_quarantine_tells_its_listener_of_its_own_changes_only() -> None:
    """add, remove and clear are told (with this replica's name on the entry); entries loaded
    from the fleet and forgets are not."""
    q, listener = Quarantine(ttl_s=10, max_entries=5), Recorder()
    q.attach(listener, "a")
    entry = q.add("x", "tiny", "alone", 1, now=0, proven=True)
    assert entry.found_by == "a"
    assert entry.proven
    q.load(_entry("y"))
    q.forget("y")
    q.remove("x")
    q.clear()
    assert listener.events == [("quarantined", "x"), ("released", "x"), ("released", None)]


def test_a_fleet_suspect_is_a_suspect_without_a_local_failure() -> None:
    """`mark` makes a suspect (it runs alone next) without counting a failure here and without
    telling the listener; `charge` counts and tells."""
    book, listener = SuspectBook(ttl_s=10, max_entries=5), Recorder()
    book.attach(listener)
    book.mark("x", None, now=0)
    assert book.is_suspect("x", now=1)
    assert listener.events == []
    assert book.charge("x", None, now=2).failures == 1
    assert listener.events == [("charged", "x")]
    assert not book.is_suspect("x", now=20)


def _shared(**fields: Any) -> dict[str, Any]:
    return {"isolation": {"shared": {"url": "redis://redis:6379/0", **fields}}}


def test_shared_is_off_by_default_and_defaults_are_sane() -> None:
    """Without `isolation.shared` nothing is shared; with a URL alone the defaults apply."""
    assert parse_config({}).isolation.shared is None
    shared = parse_config(_shared()).isolation.shared
    assert shared is not None
    assert shared.key_prefix == "vllm-guard"
    assert shared.replica_id is None  # the host name, at run time
    assert shared.password_env == "VLLM_GUARD_REDIS_PASSWORD"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"url": "redis://:secret@redis:6379"}, "must not hold a password"),
        ({"url": "redis://user:secret@redis:6379"}, "must not hold a password"),
        ({"url": "redis://redis:6379/0?password=secret"}, "must not hold a password"),
        ({"url": "http://redis:6379"}, "must start with one of"),
        ({"url": "redis:///0"}, "needs a host"),
        ({"url": "unix://"}, "needs the socket's path"),
        ({"key_prefix": "has space"}, "key_prefix"),
        ({"replica_id": "pod a"}, "replica_id"),
        ({"command_timeout_s": 0}, "command_timeout_s"),
        ({"passwrd": "x"}, "passwrd"),
    ],
)
def test_bad_shared_settings_are_refused_by_name(fields: dict[str, Any], message: str) -> None:
    """A password in the URL (it belongs in the environment), an unknown scheme, a missing
    host, a bad prefix or timeout, a typo: each refused, naming the key."""
    with pytest.raises(ConfigError) as err:
        parse_config(_shared(**fields))
    assert message in str(err.value)
    assert "isolation.shared" in str(err.value)


@pytest.mark.parametrize(
    "url", ["redis://redis:6379/0", "rediss://user@redis.internal:6380/2", "unix:///run/r.sock"]
)
def test_good_urls_are_taken(url: str) -> None:
    """TLS, a user name without password, and a Unix socket are all accepted."""
    shared = parse_config(_shared(url=url)).isolation.shared
    assert shared is not None
    assert shared.url == url
