"""The engine's response headers as the client gets them (gateway.proxy.response_headers):
hop-by-hop ones and those the gateway sets itself are dropped in any letter case; the rest
pass in order, repeats and non-ASCII bytes included."""

from __future__ import annotations

from gateway.proxy import HOP_BY_HOP, response_headers
from gateway.wire_connection import WireResponse


def _response(raw: list[tuple[bytes, bytes]]) -> WireResponse:
    return WireResponse(None, 200, raw, lambda _conn: None)  # type: ignore[arg-type]


def test_dropped_in_any_case_kept_in_order() -> None:
    """Date, Server, X-Request-Id and every hop-by-hop header go, however they are written;
    the others keep their order, their names as sent, and their repeats."""
    raw = [
        (b"Date", b"Tue, 01 Dec 2026 17:00:00 GMT"),
        (b"SERVER", b"uvicorn"),
        (b"content-type", b"application/json"),
        (b"Set-Cookie", b"a=1"),
        (b"x-request-id", b"engine-id"),
        (b"Transfer-Encoding", b"chunked"),
        (b"set-cookie", b"b=2"),
        (b"X-Engine", b"caf\xc3\xa9"),
        *[(name.upper().encode(), b"v") for name in sorted(HOP_BY_HOP)],
    ]
    kept = response_headers(_response(raw))
    assert list(kept.items()) == [
        ("content-type", "application/json"),
        ("Set-Cookie", "a=1"),
        ("set-cookie", "b=2"),
        ("X-Engine", "café"),
    ]
    assert kept.getall("SET-COOKIE") == ["a=1", "b=2"]


def test_bytes_that_are_not_utf8_pass_as_sent() -> None:
    """A header value that is not UTF-8 is kept byte for byte (surrogate escapes), as the
    engine's headers were before the relay."""
    kept = response_headers(_response([(b"X-Odd", b"\xff\xfe")]))
    assert kept["x-odd"].encode("utf-8", "surrogateescape") == b"\xff\xfe"
