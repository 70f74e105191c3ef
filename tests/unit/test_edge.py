"""The checks made on a request's head (gateway.edge) and the config's refusal of an admin
port that is the client port."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import ConfigError, parse_config
from gateway.edge import (
    api_key_hashes,
    authorized,
    client_key,
    encoding_refusal,
    expect_refusal,
    key_required,
)
from gateway.reload import pin_fixed


@pytest.mark.parametrize(
    ("value", "refused"),
    [
        (None, False),
        ("identity", False),
        ("Identity, identity", False),
        ("gzip", True),
        ("deflate", True),
        ("br", True),
        ("identity, gzip", True),
        ("x-anything", True),
    ],
)
def test_any_content_coding_but_identity_is_415(value: str | None, refused: bool) -> None:
    """Only identity (or no Content-Encoding) passes; anything else is a 415."""
    refusal = encoding_refusal(value)
    assert (refusal is not None) is refused
    if refusal is not None:
        assert refusal.status == 415


@pytest.mark.parametrize(("length", "refused"), [(None, False), (100, False), (101, True)])
def test_expect_refusal_past_the_limit(length: int | None, refused: bool) -> None:
    """A body announced over the limit is refused 413 before it is sent."""
    refusal = expect_refusal(length, 100)
    assert (refusal is not None) is refused


KEYS = api_key_hashes(("A", "B", "C"), {"A": "one", "B": "", "C": "two"})


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        (None, False),
        ("", False),
        ("Bearer one", True),
        ("bearer two", True),
        ("Bearer three", False),
        ("Basic one", False),
        ("one", False),
        ("Bearer  one", False),
    ],
)
def test_bearer_token_must_be_one_of_the_keys(header: str | None, ok: bool) -> None:
    """As vLLM checks it: the `Bearer` scheme (any case) and one of the keys exactly."""
    assert len(KEYS) == 2  # an empty variable is no key
    assert authorized(header, KEYS) is ok


@pytest.mark.parametrize(
    ("method", "path", "required"),
    [
        ("POST", "/v1/completions", True),
        ("GET", "/v1/models", True),
        ("OPTIONS", "/v1/completions", False),
        ("GET", "/health", False),
        ("POST", "/tokenize", False),
        ("POST", "/inference/v1/generate", True),
    ],
)
def test_key_required_where_vllm_checks_it(method: str, path: str, required: bool) -> None:
    """vLLM's guarded prefixes need the key; OPTIONS and other paths do not."""
    assert key_required(method, path) is required


def test_client_key_never_holds_the_token() -> None:
    """A client is a digest of its bearer token, or its address without one."""
    key = client_key("Bearer secret-token", "10.0.0.1")
    assert "secret-token" not in key
    assert key == "token:" + hashlib.sha256(b"secret-token").hexdigest()[:16]
    assert client_key(None, "10.0.0.1") == "peer:10.0.0.1"
    assert client_key("Basic xyz", "10.0.0.1") == "peer:10.0.0.1"


@pytest.mark.parametrize(
    ("server_host", "admin_host", "refused"),
    [
        ("0.0.0.0", "127.0.0.1", True),
        ("127.0.0.1", "127.0.0.1", True),
        ("127.0.0.1", "0.0.0.0", True),
        ("10.0.0.5", "127.0.0.1", False),
    ],
)
def test_admin_port_equal_to_server_port(server_host: str, admin_host: str, refused: bool) -> None:
    """The admin listener may not share the client port on an address both would bind."""
    data = {
        "server": {"host": server_host, "port": 9000},
        "admin": {"host": admin_host, "port": 9000},
    }
    if refused:
        with pytest.raises(ConfigError, match=r"admin\.port"):
            parse_config(data)
    else:
        parse_config(data)


def test_check_config_refuses_the_shared_port(tmp_path: Path) -> None:
    """`vllm-guard check-config` exits 1 for an admin port equal to the server port."""
    path = tmp_path / "config.yaml"
    path.write_text("server:\n  port: 8080\nadmin:\n  port: 8080\n")
    assert main(["check-config", str(path)]) == 1


def test_connection_bounds_read_at_start_wait_for_a_restart() -> None:
    """A reload keeps the header and keep-alive timeouts, the API key variables and the
    counting threads (read when the listeners and the app start) at their running values and
    names them; the body and client write timeouts, read per request, apply."""
    running = parse_config({})
    new = parse_config(
        {
            "server": {
                "header_timeout_s": 1,
                "keepalive_timeout_s": 2,
                "api_key_env": ["OTHER"],
                "count_threads": 4,
                "body_timeout_s": 3,
                "client_write_timeout_s": 4,
            }
        }
    )
    pinned, fixed, _ = pin_fixed(running, new)
    assert pinned.server.header_timeout_s == running.server.header_timeout_s
    assert pinned.server.keepalive_timeout_s == running.server.keepalive_timeout_s
    assert pinned.server.api_key_env == running.server.api_key_env
    assert pinned.server.count_threads == running.server.count_threads
    assert (pinned.server.body_timeout_s, pinned.server.client_write_timeout_s) == (3, 4)
    assert set(fixed) == {
        "server.header_timeout_s",
        "server.keepalive_timeout_s",
        "server.api_key_env",
        "server.count_threads",
    }
