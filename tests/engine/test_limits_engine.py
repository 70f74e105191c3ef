"""The request limits in front of the real vLLM (tiny model, CPU): ordinary shapes near each
default bound are still served, and the looping-$ref schema is refused before the engine
sees it. Structured-output cases are kept to two: grammar compiles are slow on the CPU."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import Limits
from tests.helpers import MODEL_DIR, base_url, error_envelope, gateway_config, post
from tests.real_engine import RealEngine

DEFAULTS = Limits()
VOCAB = 2000  # models/tiny: config.json and tokenizer.json agree


def chat(**fields: Any) -> dict[str, Any]:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 4,
        "temperature": 0,
        **fields,
    }


def completion(**fields: Any) -> dict[str, Any]:
    return {
        "model": "tiny",
        "prompt": "Name a colour.",
        "max_tokens": 4,
        "temperature": 0,
        **fields,
    }


TOP_IDS = list(range(VOCAB - DEFAULTS.max_token_ids, VOCAB))  # the last 1024 ids, 1999 included

SERVED = [
    ("logit_bias at the count and the top id", "/v1/chat/completions",
     chat(logit_bias={str(i): 0.5 for i in TOP_IDS})),
    ("allowed and stop token ids", "/v1/completions",
     completion(allowed_token_ids=TOP_IDS, stop_token_ids=[VOCAB - 1])),
    ("top_logprobs at max_logprobs", "/v1/chat/completions",
     chat(logprobs=True, top_logprobs=DEFAULTS.max_logprobs)),
    ("logprobs at max_logprobs", "/v1/completions", completion(logprobs=DEFAULTS.max_logprobs)),
    ("stop strings at both bounds", "/v1/chat/completions",
     chat(stop=[f"{i:04d}" + "z" * (DEFAULTS.max_stop_chars - 4)
                for i in range(DEFAULTS.max_stop)])),
    ("bad words at the count", "/v1/completions",
     completion(bad_words=[f"word{i}" for i in range(DEFAULTS.max_bad_words)])),
    ("token-id prompt up to the top id", "/v1/completions",
     completion(prompt=[1, 17, 400, VOCAB - 1])),
    ("n choices", "/v1/completions", completion(n=8, max_tokens=16, temperature=1.0, seed=7)),
    ("priority 0 and a null internal field", "/v1/chat/completions",
     chat(priority=0, kv_transfer_params=None)),
    ("a json schema", "/v1/chat/completions",
     chat(max_tokens=8, response_format={"type": "json_schema", "json_schema": {
         "name": "colour", "schema": {"type": "object", "properties": {
             "name": {"type": "string"}}, "required": ["name"]}}})),
    ("a choice", "/v1/completions", completion(structured_outputs={"choice": ["red", "blue"]})),
]  # fmt: skip


def _config(engine: RealEngine) -> Any:
    return gateway_config(
        engine.url,
        models={"tiny": {"tokenizer": str(MODEL_DIR), "token_source": "local"}},
    )


@pytest.mark.parametrize(("path", "body"), [pytest.param(*r[1:], id=r[0]) for r in SERVED])
async def test_ordinary_shapes_near_the_bounds_are_served(
    gateway_server: Any, real_engine: RealEngine, path: str, body: dict[str, Any]
) -> None:
    """The default limits let these through and the engine answers them."""
    server = await gateway_server(_config(real_engine))
    answer = await post(base_url(server) + path, body, timeout=120)
    assert answer["status"] == 200, answer["json"]
    assert "X-Vllm-Guard-Would-Reject" not in answer["headers"]


async def test_the_looping_ref_schema_never_reaches_the_engine(
    gateway_server: Any, real_engine: RealEngine
) -> None:
    """The $ref loop that segfaulted vLLM 0.9.2 is a 400 naming response_format; the engine's
    access log has no line for it, and the engine still serves."""
    server = await gateway_server(_config(real_engine))
    loop = {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
    body = chat(
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": loop}}
    )
    path = "/v1/chat/completions"
    before = real_engine.access_count(path)
    answer = await post(base_url(server) + path, body, timeout=60)
    assert answer["status"] == 400
    assert error_envelope(answer["json"], 400)["param"] == "response_format"
    assert real_engine.access_count(path) == before
    assert (await post(base_url(server) + path, chat(), timeout=60))["status"] == 200
