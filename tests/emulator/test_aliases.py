"""Model aliases: every name the engine serves for one model (the emulator serving
`--served-model-name tiny tiny-alias tiny-own` and a LoRA adapter, with vLLM's `root` and
`parent`) gets that model's policy, unless it has one of its own."""

from __future__ import annotations

import aiohttp
import structlog

from engine.emulator import EmulatorSettings, create_emulator_app
from gateway.policy import HEADER_MAX_TOKENS
from tests.helpers import StartGateway, base_url, gateway_config, run_fake_upstream, send


async def test_aliases_and_adapters_take_their_models_policy(
    gateway_server: StartGateway,
) -> None:
    """With a policy under `models: tiny` only, `tiny-alias` and the adapter `tiny-lora` are
    clamped like `tiny`, and refused like it; `tiny-own` keeps its own entry; the names
    without an entry of their own are logged when the engine is ready."""
    settings = EmulatorSettings(
        served_model_names=("tiny", "tiny-alias", "tiny-own"),
        lora_modules={"tiny-lora": "/adapters/tiny-lora"},
    )
    emulator = await run_fake_upstream(create_emulator_app(settings))
    try:
        config = gateway_config(
            base_url(emulator),
            models={
                "tiny": {"max_tokens_limit": 256, "max_n": 2},
                "tiny-own": {"max_tokens_limit": 100},
            },
        )
        with structlog.testing.capture_logs() as logs:
            gateway = await gateway_server(config)
        url = gateway.url + "/v1/completions"
        async with aiohttp.ClientSession() as s:
            clamped = {}
            for name in ("tiny", "tiny-alias", "tiny-lora", "tiny-own"):
                answer = await send(s, url, {"model": name, "prompt": "hi", "max_tokens": 300})
                assert answer["status"] == 200, answer
                clamped[name] = answer["headers"][HEADER_MAX_TOKENS]
            refused = await send(s, url, {"model": "tiny-alias", "prompt": "hi", "n": 3})
    finally:
        await emulator.close()
    assert clamped == {
        "tiny": "clamped 300->256",
        "tiny-alias": "clamped 300->256",
        "tiny-lora": "clamped 300->256",
        "tiny-own": "clamped 300->100",
    }
    assert refused["status"] == 400
    reported = [e for e in logs if e["event"] == "served_models_without_policy"]
    assert [e["models"] for e in reported] == [{"tiny-alias": "tiny", "tiny-lora": "tiny"}]
