"""The supervisor's decisions, as pure functions: no I/O, no clock (time is an argument).

When to give up, how long to back off, whether a stall is a wedge, what Retry-After to give,
and what the engine's /v1/models and /metrics say. `engine.supervisor` does the I/O around them.
"""

from __future__ import annotations

from collections.abc import Sequence

PROGRESS_COUNTERS = ("vllm:generation_tokens_total", "vllm:prompt_tokens_total")
"""Counters in the engine's /metrics whose movement proves that it is working."""


def backoff_delay(attempt: int, base: float, maximum: float) -> float:
    """Delay before restart number `attempt` (1 for the first): base, 2·base, 4·base, ... capped
    at `maximum`."""
    return min(maximum, base * 2.0 ** min(max(attempt - 1, 0), 64))


def should_give_up(
    restart_times: Sequence[float], now: float, max_restarts: int, window: float
) -> bool:
    """Whether a failure at `now` is one too many: `max_restarts` restarts already happened
    within the last `window` seconds."""
    return sum(1 for t in restart_times if now - t < window) >= max_restarts


def decide_wedge(
    stalled_for: float | None,
    tokens_quiet_for: float | None,
    since_cleared: float | None,
    wedge_timeout: float,
) -> bool:
    """Whether the engine is suspected of a wedge, for a probe generation to settle.

    `stalled_for`: seconds without a byte to any in-flight request (None: nothing in flight).
    `tokens_quiet_for`: seconds the token counters have stood still as far as seen (None: the
    engine has no readable /metrics, so the stall alone decides). `since_cleared`: seconds since
    a probe generation last answered during this suspicion (None: never).
    """
    if stalled_for is None or stalled_for <= wedge_timeout:
        return False
    if tokens_quiet_for is not None and tokens_quiet_for <= wedge_timeout:
        return False  # busy, not wedged: tokens move while some requests wait
    return since_cleared is None or since_cleared > wedge_timeout


def retry_after(expected_ready_at: float | None, now: float, fallback: float) -> float:
    """Seconds a client should wait before retrying: until the engine is expected ready, at least
    one; `fallback` when nothing is expected."""
    if expected_ready_at is None:
        return max(1.0, fallback)
    return max(1.0, expected_ready_at - now)


def parse_models(payload: object) -> dict[str, int]:
    """Served model ids, in listed order, to max_model_len, from a /v1/models body. vLLM lists
    LoRA adapters without a max_model_len: they take their parent's (or the first model's)."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        return {}
    lengths: dict[str, int] = {}
    parents: dict[str, str] = {}
    order: list[str] = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            continue
        model_id: str = item["id"]
        order.append(model_id)
        length = item.get("max_model_len")
        if isinstance(length, int) and not isinstance(length, bool) and length > 0:
            lengths[model_id] = length
        if isinstance(item.get("parent"), str):
            parents[model_id] = item["parent"]
    default = next(iter(lengths.values()), None)
    models: dict[str, int] = {}
    for model_id in order:
        length = lengths.get(model_id) or lengths.get(parents.get(model_id, "")) or default
        if length is not None:
            models[model_id] = length
    return models


def parse_model_families(payload: object) -> dict[str, str]:
    """Each served id of a /v1/models body to the model it serves: its `root` (vLLM gives
    every --served-model-name of one model the same root); a LoRA adapter (with a `parent`)
    to its base model's. The gateway gives names of one model the same policy."""
    data = payload.get("data") if isinstance(payload, dict) else None
    items = [i for i in data if isinstance(i, dict)] if isinstance(data, list) else []
    roots: dict[str, str] = {}
    parents: dict[str, str] = {}
    for item in items:
        model_id = item.get("id")
        if not isinstance(model_id, str):
            continue
        root = item.get("root")
        roots[model_id] = root if isinstance(root, str) and root else model_id
        if isinstance(item.get("parent"), str):
            parents[model_id] = item["parent"]
    return {
        model_id: roots.get(parents[model_id], parents[model_id]) if model_id in parents else root
        for model_id, root in roots.items()
    }


def parse_counters(text: str, names: Sequence[str] = PROGRESS_COUNTERS) -> float | None:
    """The sum of all samples of the named counters in Prometheus text, or None if none."""
    total: float | None = None
    for line in text.splitlines():
        name, brace, rest = line.partition("{")
        if brace:
            rest = rest.rpartition("}")[2]  # label values may hold spaces
        else:
            name, _, rest = line.partition(" ")
        if name.strip() not in names:
            continue
        try:
            total = (total or 0.0) + float(rest.split()[0])
        except (IndexError, ValueError):
            continue
    return total
