"""The supervisor's decisions, as pure functions: no I/O, no clock (time is an argument).

When to give up, how long to back off, whether a stall is a wedge, what Retry-After to give,
which generation path the readiness probe takes, whether the engine restarted under the gateway,
and what the engine's /v1/models and /metrics say. `engine.supervisor` does the I/O around them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from engine.facts import parse_facts

PROGRESS_COUNTERS = ("vllm:generation_tokens_total", "vllm:prompt_tokens_total")
"""Counters in the engine's /metrics whose movement proves that it is working."""

START_TIME = "process_start_time_seconds"
"""vLLM's API server process start (prometheus_client's process collector; absent when vLLM
runs several API server processes): a new value is a new process."""
RESTART_COUNTERS = (*PROGRESS_COUNTERS, "vllm:request_success_total")
"""Counters that only grow within one engine process: one that went backwards is a new one."""

ProbeKind = Literal["completions", "chat"]
PROBE_PROMPT = "ping"
FALL_THROUGH = frozenset({404, 405})
"""Answers of /v1/completions that send the `auto` probe to chat: the path is not served."""


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
    """Served model ids, in listed order, to max_model_len, from a /v1/models body (LoRA
    adapters take their parent's length; see `engine.facts.parse_facts`)."""
    return dict(parse_facts(payload).lengths)


def parse_model_families(payload: object) -> dict[str, str]:
    """Each served id of a /v1/models body to the model it serves (`EngineFacts.families`)."""
    return dict(parse_facts(payload).families)


def parse_counters(text: str, names: Sequence[str] = PROGRESS_COUNTERS) -> float | None:
    """The sum of all samples of the named counters in Prometheus text, or None if none."""
    samples = parse_samples(text, names)
    return sum(samples.values()) if samples else None


def parse_samples(text: str, names: Sequence[str]) -> dict[str, float]:
    """Per name, the sum of its samples (all label sets) in Prometheus text; names without a
    sample are left out."""
    wanted = frozenset(names)
    sums: dict[str, float] = {}
    for line in text.splitlines():
        name, brace, rest = line.partition("{")
        if brace:
            rest = rest.rpartition("}")[2]  # label values may hold spaces
        else:
            name, _, rest = line.partition(" ")
        name = name.strip()
        if name not in wanted:
            continue
        try:
            sums[name] = sums.get(name, 0.0) + float(rest.split()[0])
        except (IndexError, ValueError):
            continue
    return sums


def parse_marks(text: str) -> dict[str, float]:
    """What /metrics says of the engine process's identity: its start time and the counters
    that only grow within one process (`restart_evidence` compares two readings)."""
    return parse_samples(text, (START_TIME, *RESTART_COUNTERS))


def restart_evidence(
    before: Mapping[str, float] | None, after: Mapping[str, float] | None, refused: bool
) -> str | None:
    """Why a healthy engine is not the process it was (None: no evidence it is not).

    `before`/`after`: `parse_marks` of an earlier and of the current /metrics (None when not
    readable); `refused`: a connection to the engine was refused since `before` (nothing was
    listening). The process start time decides when both readings carry it; else a counter
    that went backwards is a new process; else a refused connection followed by this healthy
    answer is one (the engine was gone and is back).
    """
    if before is not None and after is not None:
        if START_TIME in before and START_TIME in after:
            if before[START_TIME] != after[START_TIME]:
                return (
                    f"{START_TIME} changed from {before[START_TIME]:.0f} to {after[START_TIME]:.0f}"
                )
            return None
        for name in RESTART_COUNTERS:
            if name in before and name in after and after[name] < before[name]:
                return f"{name} went backwards from {before[name]:g} to {after[name]:g}"
    if refused:
        return "a connection was refused, then /health answered"
    return None


def probe_kinds(mode: str, discovered: ProbeKind | None) -> tuple[ProbeKind, ...]:
    """The generation paths to try, in order, for one probe: the configured one; for `auto`
    the one discovered during this start, else completions then chat."""
    if mode == "completions":
        return ("completions",)
    if mode == "chat":
        return ("chat",)
    if discovered is not None:
        return (discovered,)
    return ("completions", "chat")


def probe_request(kind: ProbeKind, model: str) -> tuple[str, dict[str, object]]:
    """Path and body of a one-token, greedy probe generation."""
    common: dict[str, object] = {"model": model, "max_tokens": 1, "temperature": 0}
    if kind == "chat":
        return "/v1/chat/completions", {
            **common,
            "messages": [{"role": "user", "content": PROBE_PROMPT}],
        }
    return "/v1/completions", {**common, "prompt": PROBE_PROMPT}
