"""Load test of an OpenAI-compatible endpoint (vllm-guard in front of an engine): users who send
the mix real clients send, and a summary of what LLM users read.

    make loadtest                                    # emulator + gateway started for the run
    make loadtest HOST=http://127.0.0.1:8080         # a stack that is already running
    .venv/bin/locust -f loadtest/locustfile.py --host http://127.0.0.1:8080   # web UI

The mix (weights in TASKS): chat and completions, streamed and not, with and without
`max_tokens`; prompts over the context window; malformed bodies (not JSON, not an object,
`max_tokens: 0`, too many choices, a non-JSON content type, an unknown model); and, with
`--poison MARKER`, a prompt that carries the marker the emulator dies on
(`python -m engine.emulator --die-on MARKER`).

Every task has the statuses it may get (EXPECTED). Anything else, a request that got no answer
(connection refused or reset, timeout), a 200 that is not a well-formed answer, or a stream that
ends with an error event is counted as unexpected, marked as a failure in locust's statistics,
and makes locust exit 1; so does a run that sent no request at all.

Recorded per task: answers by status; for streams, time to first token (the first event that
carries text) and inter-token pace; end-to-end latency; output tokens per second
(`usage.completion_tokens` over the time after the first token for streams, over the whole
request otherwise). Streamed requests also appear in locust's own table as `TTFT <task>` and
`E2E <task>` (locust times a streamed request only to its headers). The summary is printed when
locust quits and, with `--summary-json PATH`, written as JSON.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from locust import HttpUser, between, events, task
from locust.env import Environment

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "river",
    "stone",
    "light",
    "garden",
    "window",
    "number",
    "écrit",
    "naïve",
    "🙂",
    "the",
    "of",
    "and",
    "return",
    "self",
    "model",
    "token",
    "engine",
    "policy",
]

OK = frozenset({200})
# During an engine death and restart (--poison), a request may wait in the gateway's queue past
# its timeout (503 with Retry-After); the poisoned request itself ends quarantined (422), or
# 503/502 while the engine dies under it.
DURING_DEATHS = frozenset({503})
POISONED = frozenset({422, 502, 503})

EXPECTED: dict[str, frozenset[int]] = {
    "chat": OK,
    "chat stream": OK,
    "chat no max_tokens": OK,
    "chat stream no max_tokens": OK,
    "completion": OK,
    "completion stream": OK,
    "completion no max_tokens": OK,
    "over-long prompt": frozenset({400}),
    "malformed: not JSON": frozenset({400}),
    "malformed: not an object": frozenset({400}),
    "malformed: max_tokens 0": frozenset({400}),
    "malformed: n over max_n": frozenset({400}),
    "malformed: content type": frozenset({415}),
    "malformed: unknown model": frozenset({404}),
    "poison": POISONED,
}
"""The statuses each task may get from vllm-guard; anything else is a failure of the run."""

REQUEST_TIMEOUT_S = 120.0
OVERLONG_WORDS = 12_000
"""Words in the over-long prompt: past any context window the tiny model is served with (the
emulator's 4,096 here, the real engine's 512)."""


def text(words: int) -> str:
    return " ".join(random.choice(WORDS) for _ in range(words))


# -- what the run saw --------------------------------------------------------------------------


@dataclass
class TaskStats:
    statuses: Counter[int] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    ttft_ms: list[float] = field(default_factory=list)
    e2e_ms: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())


STATS: dict[str, TaskStats] = {}


def stats_of(name: str) -> TaskStats:
    return STATS.setdefault(name, TaskStats())


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary() -> dict[str, Any]:
    """The run in numbers: per task and in total."""
    tasks = {}
    for name, s in sorted(STATS.items()):
        tasks[name] = {
            "requests": s.requests,
            "statuses": {str(k): v for k, v in sorted(s.statuses.items())},
            "expected": sorted(EXPECTED[name]),
            "unexpected": dict(s.unexpected),
            "ttft_ms_p50": _pct(s.ttft_ms, 0.5),
            "ttft_ms_p99": _pct(s.ttft_ms, 0.99),
            "e2e_ms_p50": _pct(s.e2e_ms, 0.5),
            "e2e_ms_p99": _pct(s.e2e_ms, 0.99),
            "tokens_per_s_median": (statistics.median(s.tokens_per_s) if s.tokens_per_s else None),
        }
    unanswered = sum(s.unexpected.get("no answer", 0) for s in STATS.values())
    unexpected = sum(sum(s.unexpected.values()) for s in STATS.values())
    return {
        "requests": sum(s.requests for s in STATS.values()),
        "unexpected": unexpected,
        "unanswered": unanswered,
        "tasks": tasks,
    }


def render(report: dict[str, Any]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:,.0f}"

    lines = [
        "",
        f"{'task':<28} {'reqs':>6} {'statuses':<22} {'expected':<12} {'unexp':>5} "
        f"{'TTFT p50/p99 ms':>16} {'E2E p50/p99 ms':>16} {'tok/s':>6}",
    ]
    lines.append("-" * len(lines[1]))
    for name, t in report["tasks"].items():
        statuses = " ".join(f"{k}:{v}" for k, v in t["statuses"].items())
        expected = ",".join(str(s) for s in t["expected"])
        tps = t["tokens_per_s_median"]
        lines.append(
            f"{name:<28} {t['requests']:>6} {statuses:<22} {expected:<12} "
            f"{sum(t['unexpected'].values()):>5} "
            f"{ms(t['ttft_ms_p50']) + '/' + ms(t['ttft_ms_p99']):>16} "
            f"{ms(t['e2e_ms_p50']) + '/' + ms(t['e2e_ms_p99']):>16} "
            f"{'-' if tps is None else f'{tps:.0f}':>6}"
        )
        for why, count in t["unexpected"].items():
            lines.append(f"    unexpected: {why} x{count}")
    lines.append(
        f"total: {report['requests']} requests, {report['unexpected']} unexpected "
        f"({report['unanswered']} unanswered)"
    )
    return "\n".join(lines)


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument(
        "--poison", default="", help="send prompts with this marker (emulator --die-on)"
    )
    parser.add_argument("--model", default="tiny", help="the model name to send")
    parser.add_argument("--summary-json", default="", help="write the summary here (JSON)")


@events.quitting.add_listener
def _report(environment: Environment, **_kwargs: Any) -> None:
    report = summary()
    print(render(report), flush=True)
    path = environment.parsed_options.summary_json if environment.parsed_options else ""
    if path:
        with open(path, "w") as out:
            json.dump(report, out, indent=1)
    if report["unexpected"] or report["requests"] == 0:
        environment.process_exit_code = 1


# -- the users ---------------------------------------------------------------------------------


class LLMUser(HttpUser):
    """One client of the endpoint: a request, a short think, another request."""

    wait_time = between(0.2, 1.0)

    @property
    def model(self) -> str:
        opts = self.environment.parsed_options
        return str(opts.model) if opts else "tiny"

    @property
    def poisoning(self) -> bool:
        opts = self.environment.parsed_options
        return bool(opts and opts.poison)

    def allowed(self, name: str) -> frozenset[int]:
        allowed = EXPECTED[name]
        return allowed | DURING_DEATHS if self.poisoning else allowed

    # Requests and their checks.

    def send(
        self,
        name: str,
        path: str,
        payload: Any = None,
        *,
        data: bytes | None = None,
        content_type: str = "application/json",
    ) -> None:
        """POST a body and judge the answer against EXPECTED[name]."""
        s = stats_of(name)
        stream = isinstance(payload, dict) and bool(payload.get("stream"))
        body = data if data is not None else json.dumps(payload).encode()
        started = time.perf_counter()
        try:
            with self.client.post(
                path,
                data=body,
                headers={"Content-Type": content_type},
                name=name,
                stream=stream,
                timeout=REQUEST_TIMEOUT_S,
                catch_response=True,
            ) as resp:
                status = resp.status_code
                s.statuses[status] += 1
                if status == 0:  # locust's way of saying there was no answer
                    s.unexpected["no answer"] += 1
                    resp.failure(f"no answer: {resp.error}")
                    return
                if status not in self.allowed(name):
                    s.unexpected[f"status {status}"] += 1
                    resp.failure(f"status {status}, expected {sorted(self.allowed(name))}")
                    return
                problem = (
                    self.read_stream(name, resp, started)
                    if stream and status == 200
                    else self.read_answer(name, resp, started, status)
                )
                if problem:
                    s.unexpected[problem] += 1
                    resp.failure(problem)
                else:
                    resp.success()
        except OSError as exc:  # a stream cut in the middle
            s.unexpected["no answer"] += 1
            self.environment.events.request.fire(
                request_type="POST",
                name=name,
                response_time=(time.perf_counter() - started) * 1000,
                response_length=0,
                exception=exc,
                context={},
            )

    def read_answer(self, name: str, resp: Any, started: float, status: int) -> str | None:
        s = stats_of(name)
        try:
            answer = resp.json()
        except ValueError:
            return f"status {status} with a body that is not JSON"
        elapsed = time.perf_counter() - started
        s.e2e_ms.append(elapsed * 1000)
        if status != 200:
            error = answer.get("error") if isinstance(answer, dict) else None
            if not isinstance(error, dict) or not isinstance(error.get("message"), str):
                return f"status {status} without the OpenAI error envelope"
            return None
        if not isinstance(answer, dict) or not answer.get("choices"):
            return "200 without choices"
        tokens = (answer.get("usage") or {}).get("completion_tokens")
        if isinstance(tokens, int) and tokens > 0 and elapsed > 0:
            s.tokens_per_s.append(tokens / elapsed)
        return None

    def read_stream(self, name: str, resp: Any, started: float) -> str | None:
        s = stats_of(name)
        first: float | None = None
        tokens: int | None = None
        done = False
        for raw in resp.iter_lines():
            if not raw.startswith(b"data: "):
                continue
            data = raw[6:]
            if data == b"[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                return "stream ended with an error event"
            if event.get("usage"):
                tokens = event["usage"].get("completion_tokens")
            for choice in event.get("choices") or []:
                piece = choice.get("text") or (choice.get("delta") or {}).get("content")
                if piece and first is None:
                    first = time.perf_counter()
        end = time.perf_counter()
        if not done:
            return "stream without data: [DONE]"
        s.e2e_ms.append((end - started) * 1000)
        fire = self.environment.events.request.fire
        fire(
            request_type="E2E",
            name=name,
            response_time=(end - started) * 1000,
            response_length=0,
            exception=None,
            context={},
        )
        if first is not None:
            s.ttft_ms.append((first - started) * 1000)
            fire(
                request_type="TTFT",
                name=name,
                response_time=(first - started) * 1000,
                response_length=0,
                exception=None,
                context={},
            )
            if tokens and end > first:
                s.tokens_per_s.append(max(tokens - 1, 1) / (end - first))
        return None

    # Bodies.

    def chat(self, words: int, max_tokens: int | None, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": text(words)},
            ],
            "temperature": 0.7,
        }
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    def completion(self, words: int, max_tokens: int | None, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "prompt": text(words), "temperature": 0.7}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    # The mix.

    @task(6)
    def chat_plain(self) -> None:
        self.send(
            "chat", "/v1/chat/completions", self.chat(random.randint(20, 300), 32, stream=False)
        )

    @task(6)
    def chat_stream(self) -> None:
        self.send(
            "chat stream",
            "/v1/chat/completions",
            self.chat(random.randint(20, 300), random.randint(16, 64), stream=True),
        )

    @task(2)
    def chat_default(self) -> None:
        self.send(
            "chat no max_tokens",
            "/v1/chat/completions",
            self.chat(random.randint(20, 100), None, stream=False),
        )

    @task(2)
    def chat_stream_default(self) -> None:
        self.send(
            "chat stream no max_tokens",
            "/v1/chat/completions",
            self.chat(random.randint(20, 100), None, stream=True),
        )

    @task(3)
    def completion_plain(self) -> None:
        self.send(
            "completion", "/v1/completions", self.completion(random.randint(10, 200), 32, False)
        )

    @task(3)
    def completion_stream(self) -> None:
        self.send(
            "completion stream",
            "/v1/completions",
            self.completion(random.randint(10, 200), random.randint(16, 64), stream=True),
        )

    @task(1)
    def completion_default(self) -> None:
        self.send(
            "completion no max_tokens",
            "/v1/completions",
            self.completion(random.randint(10, 50), None, stream=False),
        )

    @task(1)
    def overlong(self) -> None:
        self.send(
            "over-long prompt",
            "/v1/chat/completions",
            self.chat(OVERLONG_WORDS, 16, stream=random.random() < 0.5),
        )

    @task(2)
    def malformed(self) -> None:
        kind = random.randrange(6)
        chat = "/v1/chat/completions"
        if kind == 0:
            self.send("malformed: not JSON", chat, data=b'{"model": "tiny", "messages": [')
        elif kind == 1:
            self.send("malformed: not an object", chat, data=b'["model", "tiny"]')
        elif kind == 2:
            self.send("malformed: max_tokens 0", chat, self.chat(10, 0, stream=False))
        elif kind == 3:
            self.send("malformed: n over max_n", chat, {**self.chat(10, 8, False), "n": 1000})
        elif kind == 4:
            self.send(
                "malformed: content type",
                chat,
                data=json.dumps(self.chat(10, 8, False)).encode(),
                content_type="text/plain",
            )
        else:
            self.send(
                "malformed: unknown model", chat, {**self.chat(10, 8, False), "model": "nope"}
            )

    @task(1)
    def poison(self) -> None:
        opts = self.environment.parsed_options
        if not (opts and opts.poison):
            return
        # The same body every time: a client that retries a request that kills the engine.
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": f"please {opts.poison} now"}],
            "max_tokens": 8,
        }
        self.send("poison", "/v1/chat/completions", body)
