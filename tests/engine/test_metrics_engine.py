"""The metrics in front of the real vLLM: the token counters follow vLLM's own usage (a JSON
answer, and a stream with include_usage), and /engine/metrics is vLLM's own text, apart from
the gateway's."""

from __future__ import annotations

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import CHAT_PATH, StartGateway, chat, gateway_config, send
from tests.real_engine import RealEngine

pytestmark = pytest.mark.engine


async def _tokens(session: aiohttp.ClientSession, url: str) -> tuple[float, float]:
    async with session.get(url) as resp:
        text = await resp.text()
    values = {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels.get("model") == "tiny"
    }
    return (
        values.get("vllm_guard_prompt_tokens_total", 0.0),
        values.get("vllm_guard_completion_tokens_total", 0.0),
    )


async def test_real_usage_is_counted_and_the_engine_metrics_are_relayed(
    real_engine: RealEngine, gateway_server: StartGateway, session: aiohttp.ClientSession
) -> None:
    """One JSON answer and one stream with include_usage add exactly vLLM's usage to the
    token counters; /engine/metrics is vLLM's `vllm:` text and /metrics has none of it."""
    server = await gateway_server(gateway_config(real_engine.url))
    url = server.url + "/metrics"
    before = await _tokens(session, url)
    whole = await send(session, server.url + CHAT_PATH, chat("hello", max_tokens=4))
    assert whole["status"] == 200
    body = chat("hello", max_tokens=4, stream=True, stream_options={"include_usage": True})
    streamed = await send(session, server.url + CHAT_PATH, body)
    assert streamed["status"] == 200
    usages = [whole["json"]["usage"]]
    usages += [e["usage"] for e in streamed["events"] if isinstance(e, dict) and e.get("usage")]
    after = await _tokens(session, url)
    assert after[0] - before[0] == sum(u["prompt_tokens"] for u in usages)
    assert after[1] - before[1] == sum(u["completion_tokens"] for u in usages)

    async with session.get(server.url + "/engine/metrics") as resp:
        assert resp.status == 200
        engine_text = await resp.text()
    async with session.get(url) as resp:
        own = await resp.text()
    assert "vllm:prompt_tokens" in engine_text
    assert "vllm_guard_" not in engine_text
    assert "vllm:" not in own
