"""The request limits in the request path, against the emulator: every refused shape is a 400
naming its field and never reaches the engine (the emulator's access log shows it); shapes at
the bounds are served; report mode forwards cost-class shapes and still refuses crash-class ones;
the relayed /tokenize and /v1/embeddings are checked too."""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from PIL import Image

from engine.emulator import EmulatorSettings, create_emulator_app
from tests.helpers import MODEL_DIR, base_url, error_envelope, gateway_config, run_fake_upstream

Json = dict[str, Any]
LIMITS = {"max_stop": 2, "max_output_tokens_total": 64}
LOOP = {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}


def chat(model: str = "tiny", **fields: Any) -> Json:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 4,
        **fields,
    }


def completion(model: str = "tiny", **fields: Any) -> Json:
    return {"model": model, "prompt": "hello there", "max_tokens": 4, **fields}


def png(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def with_image(url: str, model: str = "tiny") -> Json:
    content = [
        {"type": "text", "text": "what is it"},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    return chat(model, messages=[{"role": "user", "content": content}])


class Emulator:
    """The emulator in-process, with its access log on and every request body it got."""

    def __init__(self, server: TestServer, bodies: list[tuple[str, Json]]) -> None:
        self.server = server
        self.bodies = bodies

    def reached(self, path: str) -> int:
        return sum(1 for p, _ in self.bodies if p == path)


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    app = create_emulator_app(
        EmulatorSettings(
            served_model_names=("tiny", "report", "strip", "padded"),
            tokenizer=MODEL_DIR,
            log_requests=True,
        )
    )
    bodies: list[tuple[str, Json]] = []

    async def keep(request: web.Request, _response: web.StreamResponse) -> None:
        if request.method == "POST":
            bodies.append((request.path, json.loads(await request.read() or b"null")))

    app.on_response_prepare.append(keep)
    server = await run_fake_upstream(app)
    yield Emulator(server, bodies)
    await server.close()


@pytest.fixture
async def gateway(emulator: Emulator, gateway_server: Any, tmp_path: Path) -> str:
    policy = {"tokenizer": str(MODEL_DIR), "token_source": "local", "on_exceed": "reject"}
    # A model whose config.json says 1500 while its tokenizer knows 2000 ids.
    padded = tmp_path / "padded"
    padded.mkdir()
    shutil.copy(MODEL_DIR / "tokenizer.json", padded / "tokenizer.json")
    (padded / "config.json").write_text(json.dumps({"vocab_size": 1500}))
    config = gateway_config(
        base_url(emulator.server),
        engine={"probe_interval_s": 60},  # no probe generations during a test
        models={
            "tiny": {**policy, "limits": LIMITS},
            "report": {**policy, "mode": "report", "limits": LIMITS},
            "strip": {**policy, "limits": {"forbidden_action": "strip"}},
            "padded": {**policy, "limits": {"model_dir": str(padded)}},
        },
    )
    url = base_url(await gateway_server(config))
    emulator.bodies.clear()  # the supervisor's probe generation, before the tests' own
    return url


async def post(url: str, body: Json) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


REFUSED = [
    ("/v1/chat/completions", chat(logit_bias={"2000": 5}), "logit_bias"),
    ("/v1/chat/completions", chat(stop_token_ids=[1, 99999]), "stop_token_ids"),
    ("/v1/chat/completions", chat(allowed_token_ids=[-1]), "allowed_token_ids"),
    ("/v1/completions", completion(prompt=[1, 2, 2000]), "prompt"),
    ("/v1/chat/completions", chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    ("/v1/completions", completion(prompt_logprobs=1), "prompt_logprobs"),
    ("/v1/chat/completions", chat(kv_transfer_params={"do_remote_decode": True}),
     "kv_transfer_params"),
    ("/v1/chat/completions", chat(priority=-10), "priority"),
    ("/v1/chat/completions",
     chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": LOOP}}),
     "response_format"),
    ("/v1/chat/completions",
     chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "obj"}}}]),
     "tools"),
    ("/v1/completions", completion(guided_json={"$ref": "#"}), "guided_json"),
    ("/v1/chat/completions", chat(stop=["a", "b", "c"]), "stop"),
    ("/v1/completions", completion(n=2, max_tokens=33), "max_tokens"),
    ("/v1/chat/completions", with_image("http://169.254.169.254/latest/meta-data"), "messages"),
    ("/v1/chat/completions", with_image("file:///etc/passwd"), "messages"),
    ("/v1/chat/completions", with_image(png(1, 1)), "messages"),
    ("/tokenize", {"model": "tiny", "messages": with_image("https://x.org/a.png")["messages"]},
     "messages"),
    ("/tokenize", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                   "tools": [{"type": "function", "function": {"name": "f",
                                                               "parameters": {"$ref": "#"}}}]},
     "tools"),
    ("/v1/embeddings", {"model": "tiny", "input": [[1, 2], [3, 2000]]}, "input"),
    ("/v1/embeddings", {"model": "tiny", "input": "x", "kv_transfer_params": {}},
     "kv_transfer_params"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "param"), REFUSED)
async def test_refused_shapes_never_reach_the_engine(
    emulator: Emulator,
    gateway: str,
    capsys: pytest.CaptureFixture[str],
    path: str,
    body: Json,
    param: str,
) -> None:
    """Each shape is vLLM's 400 envelope naming the field, and the emulator's access log has
    no line for it."""
    capsys.readouterr()
    status, answer, _ = await post(gateway + path, body)
    assert status == 400, answer
    assert error_envelope(answer, 400)["param"] == param
    assert f'"POST {path} HTTP/1.1"' not in capsys.readouterr().out
    assert emulator.reached(path) == 0


SERVED = [
    ("/v1/chat/completions", chat(logit_bias={"1999": 5, "0": -5})),
    ("/v1/chat/completions", chat(stop_token_ids=[1999], allowed_token_ids=list(range(1024)))),
    ("/v1/completions", completion(prompt=[1, 2, 1999])),
    ("/v1/chat/completions", chat(logprobs=True, top_logprobs=20)),
    ("/v1/chat/completions", chat(stop=["a", "b"], priority=0, kv_transfer_params=None)),
    ("/v1/completions", completion(n=2, max_tokens=32)),
    ("/v1/chat/completions",
     chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
         "type": "object", "properties": {"next": {"$ref": "#"}}}}})),
    ("/tokenize", {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}),
    ("/v1/embeddings", {"model": "tiny", "input": [[1, 2], [3, 1999]]}),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body"), SERVED)
async def test_shapes_at_the_bounds_reach_the_engine(
    emulator: Emulator,
    gateway: str,
    capsys: pytest.CaptureFixture[str],
    path: str,
    body: Json,
) -> None:
    """At each bound the request goes to the engine (its access log has the line) as sent."""
    capsys.readouterr()
    status, answer, _ = await post(gateway + path, body)
    assert f'"POST {path} HTTP/1.1"' in capsys.readouterr().out
    assert emulator.reached(path) == 1
    if path != "/v1/embeddings":  # the emulator serves no embeddings: its own 404
        assert status == 200, answer


async def test_an_image_at_the_bound_goes_on_to_the_engine(
    emulator: Emulator, gateway: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 2x2 inline image passes the limits: the engine is asked to count the prompt (the
    emulator, which has no vision, then refuses it itself)."""
    capsys.readouterr()
    await post(gateway + "/v1/chat/completions", with_image(png(2, 2)))
    assert '"POST /tokenize HTTP/1.1"' in capsys.readouterr().out
    assert emulator.reached("/tokenize") == 1


async def test_the_vocabulary_comes_from_the_model_folder(emulator: Emulator, gateway: str) -> None:
    """The padded model's bound is 1500 (config.json, smaller than its tokenizer): id 1499 is
    served, 1500 refused before the engine, and 1999 still fits the tiny model."""
    status, _, _ = await post(gateway + "/v1/completions", completion("padded", prompt=[1499]))
    assert status == 200
    status, answer, _ = await post(
        gateway + "/v1/completions", completion("padded", prompt=[1, 1500])
    )
    assert status == 400
    assert "0 <= id < 1500" in error_envelope(answer, 400)["message"]
    assert emulator.reached("/v1/completions") == 1
    status, _, _ = await post(gateway + "/v1/completions", completion(prompt=[1999]))
    assert status == 200


async def test_report_mode_forwards_cost_and_refuses_crash(
    emulator: Emulator, gateway: str
) -> None:
    """Report mode: a cost-class shape is forwarded as sent with the would-reject header; a
    crash-class one is refused as in enforce mode."""
    status, answer, headers = await post(
        gateway + "/v1/chat/completions", chat("report", stop=["a", "b", "c"])
    )
    assert status == 200, answer
    assert headers["X-Vllm-Guard-Would-Reject"] == "max_stop"
    assert emulator.bodies[-1][1]["stop"] == ["a", "b", "c"]
    status, answer, headers = await post(
        gateway + "/v1/completions", completion("report", n=2, max_tokens=40)
    )
    assert status == 200, answer
    assert headers["X-Vllm-Guard-Would-Reject"] == "max_output_tokens_total"
    assert emulator.bodies[-1][1]["max_tokens"] == 40
    before = len(emulator.bodies)
    status, answer, _ = await post(
        gateway + "/v1/chat/completions", chat("report", logit_bias={"5000": 1})
    )
    assert status == 400
    assert error_envelope(answer, 400)["param"] == "logit_bias"
    assert len(emulator.bodies) == before


async def test_strip_forwards_the_request_without_the_field(
    emulator: Emulator, gateway: str
) -> None:
    """forbidden_action strip: served, and the engine gets the body without the field."""
    status, answer, _ = await post(
        gateway + "/v1/chat/completions",
        chat("strip", kv_transfer_params={"do_remote_prefill": True}, vllm_xargs={"a": 1}),
    )
    assert status == 200, answer
    forwarded = emulator.bodies[-1][1]
    assert "kv_transfer_params" not in forwarded
    assert "vllm_xargs" not in forwarded
    assert forwarded["messages"] == chat()["messages"]
    status, _, _ = await post(
        gateway + "/tokenize",
        {"model": "strip", "prompt": "x", "kv_transfer_params": {"a": 1}},
    )
    assert status == 200
    assert "kv_transfer_params" not in emulator.bodies[-1][1]
