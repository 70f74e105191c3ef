"""The transparent relay against a fake upstream: envelopes, allow-list, headers, engine down."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from tests.helpers import (
    base_url,
    error_envelope,
    free_port,
    gateway_config,
    post,
    run_fake_upstream,
)


class FakeEngine:
    """A minimal engine stand-in that records what reached it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, CIMultiDict[str], bytes]] = []
        self.url = ""
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append((request.method, request.path, CIMultiDict(request.headers), body))
        if request.path == "/v1/models":
            return web.json_response(
                {
                    "object": "list",
                    "data": [{"id": "tiny", "object": "model", "max_model_len": 512}],
                }
            )
        if request.path == "/health":
            return web.Response()
        if request.path == "/tokenize" and b"dead-engine" in body:
            # vLLM 0.32's answer after EngineDeadError: the envelope, code 500.
            error = {"message": "EngineCore died", "type": "InternalServerError", "code": 500}
            return web.json_response({"error": {**error, "param": None}}, status=500)
        if request.path == "/tokenize":
            text = json.dumps(json.loads(body).get("prompt") or json.loads(body).get("messages"))
            return web.json_response(
                {"count": len(text.split()), "max_model_len": 512, "tokens": [], "token_strs": None}
            )
        if request.path == "/v1/completions" and b"engine-error" in body:
            return web.json_response(
                {
                    "error": {
                        "message": "bad thing",
                        "type": "BadRequestError",
                        "param": "prompt",
                        "code": 400,
                    }
                },
                status=400,
            )
        if request.path == "/v1/completions" and b"plain-500" in body:
            return web.Response(status=500, text="Internal Server Error")
        if request.path in {"/v1/completions", "/v1/chat/completions"}:
            return web.json_response(
                {
                    "object": "text_completion",
                    "choices": [{"index": 0, "text": "ok", "finish_reason": "length"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
            )
        return web.json_response({"path": request.path})

    def generation_requests(self) -> list[tuple[str, str, CIMultiDict[str], bytes]]:
        # The readiness probe sends its own one-token generation; count only client ones.
        return [
            s
            for s in self.seen
            if s[1] in {"/v1/completions", "/v1/chat/completions"} and b'"ping"' not in s[3]
        ]


@pytest.fixture
async def fake_engine() -> AsyncIterator[FakeEngine]:
    fake = FakeEngine()
    server = await run_fake_upstream(fake.app)
    fake.url = base_url(server)
    yield fake
    await server.close()


MALFORMED = [
    pytest.param(b"{not json", {"Content-Type": "application/json"}, 400, id="bad-json"),
    pytest.param(b"[1, 2]", {"Content-Type": "application/json"}, 400, id="array"),
    pytest.param(b'"text"', {"Content-Type": "application/json"}, 400, id="string"),
    pytest.param(b"", {"Content-Type": "application/json"}, 400, id="empty"),
    pytest.param(
        b'{"prompt": "\xff\xfe"}', {"Content-Type": "application/json"}, 400, id="invalid-utf8"
    ),
    pytest.param(b'{"prompt": "x"}', {"Content-Type": "text/plain"}, 415, id="content-type"),
]


@pytest.mark.parametrize(("body", "headers", "status"), MALFORMED)
async def test_malformed_bodies_get_an_envelope_and_never_reach_the_engine(
    gateway_server: Any,
    fake_engine: FakeEngine,
    body: bytes,
    headers: dict[str, str],
    status: int,
) -> None:
    """A body the gateway can judge bad is answered 4xx in vLLM's envelope, engine untouched."""
    server = await gateway_server(gateway_config(fake_engine.url))
    reply = await post(str(server.make_url("/v1/completions")), data=body, headers=headers)
    got = reply["status"]
    answer = reply["json"]
    assert got == status
    error_envelope(answer, status)
    assert fake_engine.generation_requests() == []


async def test_body_over_the_size_limit_gets_413(
    gateway_server: Any, fake_engine: FakeEngine
) -> None:
    """A body over server.max_body_bytes is refused with 413 in the envelope."""
    config = gateway_config(fake_engine.url, server={"max_body_bytes": 1000})
    server = await gateway_server(config)
    payload = json.dumps({"model": "tiny", "prompt": "x" * 5000})
    reply = await post(
        str(server.make_url("/v1/completions")),
        data=payload,
        headers={"Content-Type": "application/json"},
    )
    status = reply["status"]
    answer = reply["json"]
    assert status == 413
    error_envelope(answer, 413)
    assert fake_engine.generation_requests() == []


@pytest.mark.parametrize(
    "path",
    [
        "/v1/responses",
        "/v1/messages",
        "/invocations",
        "/pooling",
        "/v1/load_lora_adapter",
        "/sleep",
        "/reset_prefix_cache",
        "/openai/v1/responses",
        "/metrics",
        "/v1/audio/speech",
    ],
)
async def test_paths_outside_the_allow_list_get_404(
    gateway_server: Any, fake_engine: FakeEngine, path: str
) -> None:
    """Generating and control paths of vLLM other than the two guarded ones are refused."""
    server = await gateway_server(gateway_config(fake_engine.url))
    reply = await post(
        str(server.make_url(path)), data=b"{}", headers={"Content-Type": "application/json"}
    )
    status = reply["status"]
    answer = reply["json"]
    assert status == 404
    error_envelope(answer, 404)
    # The client's POST never reached it (the supervisor itself reads GET /metrics).
    assert not any(s[:2] == ("POST", path) for s in fake_engine.seen)


async def test_relay_allow_list_is_configurable(
    gateway_server: Any, fake_engine: FakeEngine
) -> None:
    """A path removed from server.relay_paths is refused; one listed is relayed."""
    config = gateway_config(fake_engine.url, server={"relay_paths": ["GET /version"]})
    server = await gateway_server(config)
    async with aiohttp.ClientSession() as s:
        async with s.get(server.make_url("/version")) as r:
            assert r.status == 200
        async with s.get(server.make_url("/openai/version")) as r:
            assert r.status == 200
        async with s.post(server.make_url("/tokenize"), json={"prompt": "x"}) as r:
            assert r.status == 404
    # Relayed requests carry the request id; the gateway's own /version read at ready does not.
    relayed = [s[1] for s in fake_engine.seen if "X-Request-Id" in s[2]]
    assert [p for p in relayed if p == "/version"] == ["/version", "/version"]


async def test_headers_request_id_and_authorization(
    gateway_server: Any, fake_engine: FakeEngine
) -> None:
    """Authorization passes, hop-by-hop headers are dropped, a safe X-Request-Id is kept and
    returned, an unsafe one is replaced."""
    server = await gateway_server(gateway_config(fake_engine.url))
    url = str(server.make_url("/openai/v1/completions"))
    body = json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 3})
    reply = await post(
        url,
        data=body,
        headers={
            "Content-Type": "application/json",
            "Authorization": "Bearer sk-test",
            "X-Request-Id": "abc-123",
            "Proxy-Authorization": "secret",
            "Keep-Alive": "5",
        },
    )
    status = reply["status"]
    headers = reply["headers"]
    assert status == 200
    assert headers["X-Request-Id"] == "abc-123"
    _, path, seen, forwarded = fake_engine.generation_requests()[-1]
    assert path == "/v1/completions"
    assert seen["Authorization"] == "Bearer sk-test"
    assert seen["X-Request-Id"] == "abc-123"
    assert "Proxy-Authorization" not in seen
    assert "Keep-Alive" not in seen
    assert json.loads(forwarded)["prompt"] == "hello"

    reply = await post(
        url,
        data=body,
        headers={"Content-Type": "application/json", "X-Request-Id": "bad id\u00e9" + "x" * 300},
    )
    status = reply["status"]
    headers = reply["headers"]
    assert status == 200
    new_id = headers["X-Request-Id"]
    assert new_id != "bad id"
    assert new_id.isalnum()
    assert len(new_id) == 32
    assert fake_engine.generation_requests()[-1][2]["X-Request-Id"] == new_id


async def test_engine_error_bodies_pass_through_and_plain_ones_become_502(
    gateway_server: Any, fake_engine: FakeEngine
) -> None:
    """An engine error in the envelope is relayed with its status; a non-JSON error is 502."""
    server = await gateway_server(gateway_config(fake_engine.url))
    url = str(server.make_url("/v1/completions"))
    reply = await post(
        url,
        data=json.dumps({"model": "tiny", "prompt": "engine-error"}),
        headers={"Content-Type": "application/json"},
    )
    status = reply["status"]
    answer = reply["json"]
    assert status == 400
    assert answer["error"]["message"] == "bad thing"
    assert answer["error"]["param"] == "prompt"
    reply = await post(
        url,
        data=json.dumps({"model": "tiny", "prompt": "plain-500"}),
        headers={"Content-Type": "application/json"},
    )
    status = reply["status"]
    answer = reply["json"]
    assert status == 502
    error_envelope(answer, 502)


async def test_a_tokenize_500_in_the_envelope_is_settled_as_an_engine_failure(
    gateway_server: Any, fake_engine: FakeEngine
) -> None:
    """A /tokenize answered 500 in vLLM's error envelope, the engine otherwise fine: a 503
    with Retry-After (the gateway could not count the prompt), not a 502 or 500, and the
    generation never reaches the engine."""
    config = gateway_config(fake_engine.url, models={"tiny": {"token_source": "engine"}})
    server = await gateway_server(config)
    body = {"model": "tiny", "prompt": "dead-engine", "max_tokens": 3}
    reply = await post(str(server.make_url("/v1/completions")), body)
    assert reply["status"] == 503, reply
    error = error_envelope(reply["json"], 503)
    assert error["message"] == "The engine answered HTTP 500 to POST /tokenize."
    assert int(reply["headers"]["Retry-After"]) >= 1
    assert fake_engine.generation_requests() == []


async def test_engine_down_gets_503_with_retry_after_at_once(gateway_server: Any) -> None:
    """With nothing listening at engine.url, generation and relayed paths answer 503 with a
    Retry-After (no waiting on timeouts), /ready is 503 and /health is 200."""
    config = gateway_config(f"http://127.0.0.1:{free_port()}")
    server = await gateway_server(config, wait_ready=False)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        for path, body in [
            (
                "/v1/chat/completions",
                {"model": "tiny", "messages": [{"role": "user", "content": "x"}]},
            ),
            ("/tokenize", {"model": "tiny", "prompt": "x"}),
        ]:
            async with s.post(server.make_url(path), json=body) as r:
                assert r.status == 503, path
                assert int(r.headers["Retry-After"]) >= 1
                error_envelope(await r.json(), 503)
        async with s.get(server.make_url("/ready")) as r:
            assert r.status == 503
        async with s.get(server.make_url("/health")) as r:
            assert r.status == 200


@pytest.mark.parametrize(
    "template_field",
    [
        {"chat_template": "{{ messages }}"},
        {"chat_template_kwargs": {"chat_template": "{{ messages }}"}},
    ],
)
async def test_untrusted_request_templates_are_refused_as_vllm_does(
    gateway_server: Any, fake_engine: FakeEngine, template_field: dict[str, Any]
) -> None:
    """A request bringing its own chat template gets vLLM's own 400 from the gateway (never
    rendered, never forwarded) unless the policy trusts request templates, as the engine's
    --trust-request-chat-template does."""
    body = {
        "model": "tiny",
        "max_tokens": 3,
        "messages": [{"role": "user", "content": "hi"}],
        **template_field,
    }
    server = await gateway_server(gateway_config(fake_engine.url))
    reply = await post(
        str(server.make_url("/v1/chat/completions")),
        data=json.dumps(body),
        headers={"Content-Type": "application/json"},
    )
    status = reply["status"]
    answer = reply["json"]
    assert status == 400
    assert "--trust-request-chat-template is not set" in answer["error"]["message"]
    assert fake_engine.generation_requests() == []
    trusting = await gateway_server(
        gateway_config(fake_engine.url, defaults={"trust_request_chat_template": True})
    )
    reply = await post(
        str(trusting.make_url("/v1/chat/completions")),
        data=json.dumps(body),
        headers={"Content-Type": "application/json"},
    )
    status = reply["status"]
    assert status == 200
    assert len(fake_engine.generation_requests()) == 1
