"""Checks made on a request's head, before its body is read: what a client may be refused
without costing the gateway a read, an inflate or a token count.

- a compressed body (any `Content-Encoding` but identity): 415, nothing inflated (vLLM takes
  no compressed bodies; the server builder turns aiohttp's own inflating off);
- `Expect: 100-continue` with a `Content-Length` over the limit: 413 instead of `100 Continue`;
- the engine's API keys, when the gateway is given them: 401 in vLLM's own shape;
- who the client is, for its share of the bulkhead: its bearer token, or its address.

Pure functions over headers and strings; the middleware and the expect handler apply them.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence

from gateway.errors import GuardError, PayloadTooLarge, UnsupportedMediaType

API_KEY_PREFIXES = ("/v1", "/v2", "/inference", "/cohere")
"""Paths vLLM checks the key on (vllm/entrypoints/serve/middleware/authenticate.py,
GUARDED_PREFIX); OPTIONS and every other path pass without one, as at the engine."""
UNAUTHORIZED_BODY = {"error": "Unauthorized"}
"""vLLM 0.32's 401 body, exactly (not the OpenAI envelope)."""


def api_key_hashes(env_names: Sequence[str], environ: Mapping[str, str]) -> tuple[bytes, ...]:
    """The SHA-256 of each API key set in the named environment variables (empty ones
    skipped); none means no key is checked. Only hashes are kept, as vLLM does."""
    keys = (environ.get(name, "") for name in env_names)
    return tuple(hashlib.sha256(key.encode()).digest() for key in keys if key)


def engine_key(env_names: Sequence[str], environ: Mapping[str, str]) -> str | None:
    """The first key set, which the gateway's own requests to the engine (probes, /tokenize)
    carry: an engine started with --api-key answers nothing without one."""
    return next((environ[n] for n in env_names if environ.get(n)), None)


def key_required(method: str, path: str) -> bool:
    """Whether vLLM would check the key on this request (`path` as the engine knows it)."""
    return method != "OPTIONS" and path.startswith(API_KEY_PREFIXES)


def authorized(authorization: str | None, key_hashes: Sequence[bytes]) -> bool:
    """Whether the Authorization header carries one of the keys as a bearer token; compared
    in constant time over every key, as vLLM does."""
    if not authorization:
        return False
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    digest = hashlib.sha256(token.encode()).digest()
    match = False
    for key in key_hashes:
        match |= hmac.compare_digest(digest, key)
    return match


def encoding_refusal(content_encoding: str | None) -> GuardError | None:
    """415 for a body sent with any content coding but identity (the header's value is not
    echoed: it is client input)."""
    if content_encoding is None:
        return None
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    if all(c == "identity" for c in codings):
        return None
    return UnsupportedMediaType(
        "Compressed request bodies are not accepted: send the body without a "
        "Content-Encoding (or with identity)."
    )


def expect_refusal(content_length: int | None, max_body_bytes: int) -> GuardError | None:
    """413 before `100 Continue` for a body announced over the limit."""
    if content_length is not None and content_length > max_body_bytes:
        return PayloadTooLarge(
            f"The request body is too large ({content_length} bytes announced; "
            f"the limit is {max_body_bytes})."
        )
    return None


def client_key(authorization: str | None, peer: str | None) -> str:
    """Who a request comes from, for `max_in_flight_per_client`: a digest of its bearer token
    (never the token itself), or its peer address when it has none."""
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token:
            return "token:" + hashlib.sha256(token.encode()).hexdigest()[:16]
    return f"peer:{peer or 'unknown'}"
