"""CPU time the gateway spends per admitted request, for prompts of about 100, 2,000 and 30,000
tokens (chat and completion), next to a bare relay; and whether a 30,000-token prompt stalls the
gateway's event loop for other requests.

    .venv/bin/python bench/admission_cost.py [--scale 1.0]      (or: make bench)

Setup, all on loopback, each in its own process:
- the engine emulator (`python -m engine.emulator`) with the tiny model's tokenizer and
  `--max-model-len 65536`, so every prompt is admitted and counted the way vLLM counts it;
- the gateway (`python -m gateway run --config ...`), token policy with the tiny tokenizer
  (`token_source: local`), in front of the emulator, logging its usual line per request (to a
  file);
- a bare relay (this script with `--relay`): about 30 lines of aiohttp that read the client's
  body and POST it to the emulator, no parsing, no counting.

Method: requests are sent one at a time (`max_tokens: 1`, not streamed) after a warm-up; the CPU
time of the gateway or relay process (user + system, all its threads, from /proc/PID/stat) is
read before and after the run and divided by the number of requests. The relay and the "exact"
gateway get as many requests as the gateway sent in its row. Separate processes keep
the client's and the emulator's CPU out of the figure; the gateway's background engine probes
are slowed down to one a minute so they do not count. /proc's clock-tick resolution (10 ms) is
why each row sends requests for a few seconds.

Two gateway rows: "gateway" runs the shipped policy, where admission decides with a cheap upper
bound of the prompt (its UTF-8 length) when no limit lies at or under it, and tokenizes only when
one could; "exact" runs a gateway whose `max_prompt_tokens` sits just above the prompt, so every
request is tokenized in full (the worst case of admission).

Event loop: while 30,000-token requests are admitted one after another, a second client sends
GET /health every 20 ms; its latencies, next to the same poll on an idle gateway, show how long
admission holds the loop. Figures vary with the machine and its load: read them as sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "tiny"
MAX_MODEL_LEN = 65_536
SIZES = (100, 2_000, 30_000)
ROW_SECONDS = 3.0
"""Each row sends requests for at least this long (at --scale 1): enough CPU time that
/proc's 10 ms clock ticks do not matter."""
MIN_REQUESTS = 20
MAX_REQUESTS = 20_000
STALL_REQUESTS = 30
"""30,000-token chats sent while /health is polled."""
WARMUP = 3
START_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 0.02
WORDS = (
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
    "x_y",
    "1234",
    "the",
    "of",
    "and",
    "return",
    "self",
)


# -- the bare relay (runs in its own process) --------------------------------------------------


async def relay_main(port: int, upstream: str) -> None:
    """Forward POST bodies as bytes to `upstream` and the answers back; nothing else."""
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        async with session.post(
            upstream + request.path, data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            payload = await resp.read()
            return web.Response(body=payload, status=resp.status, content_type=resp.content_type)

    async def health(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/chat/completions", forward)
    app.router.add_post("/v1/completions", forward)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    await session.close()


# -- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (dead ones included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)


def spawn(name: str, argv: list[str], url: str, ready_path: str, workdir: Path) -> Child:
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
    child = Child(name, proc, url, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{name} exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}"
            )
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(url + ready_path, timeout=2) as resp,  # noqa: S310
        ):
            if resp.status == 200:
                return child
        time.sleep(0.2)
    child.stop()
    raise RuntimeError(f"{name} not ready within {START_TIMEOUT_S} s; see {log}")


def start_emulator(workdir: Path) -> Child:
    port = free_port()
    return spawn(
        "emulator",
        [
            sys.executable,
            "-m",
            "engine.emulator",
            "--port",
            str(port),
            "--max-model-len",
            str(MAX_MODEL_LEN),
            "--tokenizer",
            str(MODEL_DIR),
        ],
        f"http://127.0.0.1:{port}",
        "/health",
        workdir,
    )


def start_gateway(
    name: str, engine_url: str, workdir: Path, max_prompt_tokens: int | None = None
) -> Child:
    port = free_port()
    tiny: dict[str, object] = {"tokenizer": str(MODEL_DIR), "token_source": "local"}
    if max_prompt_tokens is not None:
        tiny["max_prompt_tokens"] = max_prompt_tokens
    config = {
        "server": {"host": "127.0.0.1", "port": port, "max_body_bytes": 64 << 20},
        "admin": {"enabled": False},
        "engine": {"url": engine_url, "probe_interval_s": 60, "wedge_check_interval_s": 60},
        "logging": {"format": "json", "level": "info"},
        "models": {"tiny": tiny},
    }
    path = workdir / f"{name}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return spawn(
        name,
        [sys.executable, "-m", "gateway", "run", "--config", str(path)],
        f"http://127.0.0.1:{port}",
        "/ready",
        workdir,
    )


def start_relay(engine_url: str, workdir: Path) -> Child:
    port = free_port()
    return spawn(
        "relay",
        [sys.executable, __file__, "--relay", str(port), engine_url],
        f"http://127.0.0.1:{port}",
        "/health",
        workdir,
    )


@contextlib.contextmanager
def running(children: list[Child]) -> Iterator[list[Child]]:
    try:
        yield children
    finally:
        for child in reversed(children):
            child.stop()


# -- prompts -----------------------------------------------------------------------------------


def prompt_text(tokens: int) -> str:
    """A varied text of about `tokens` tokens with the tiny tokenizer (a completion prompt)."""
    sys.path.insert(0, str(ROOT))
    from engine.tokenization import PromptTokenizer

    tok = PromptTokenizer.from_dir(MODEL_DIR)
    words: list[str] = []
    step = max(1, tokens // 4)
    while True:
        words += [
            WORDS[(i * 7 + i // 5) % len(WORDS)] for i in range(len(words), len(words) + step)
        ]
        n = len(tok.encode_completion(" ".join(words)))
        if n >= tokens:
            break
        step = max(1, (tokens - n) // 2)
    while len(words) > 1 and len(tok.encode_completion(" ".join(words[:-1]))) >= tokens:
        words.pop()
    return " ".join(words)


def body(kind: str, text: str) -> bytes:
    common = {"model": "tiny", "max_tokens": 1, "temperature": 0}
    if kind == "chat":
        return json.dumps({**common, "messages": [{"role": "user", "content": text}]}).encode()
    return json.dumps({**common, "prompt": text}).encode()


def path_of(kind: str) -> str:
    return "/v1/chat/completions" if kind == "chat" else "/v1/completions"


# -- measuring ---------------------------------------------------------------------------------


async def post(session: aiohttp.ClientSession, url: str, payload: bytes) -> dict[str, object]:
    async with session.post(
        url, data=payload, headers={"Content-Type": "application/json"}
    ) as resp:
        answer = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"{url} answered {resp.status}: {answer}")
        return dict(answer)


async def cpu_per_request(
    child: Child, kind: str, payload: bytes, min_requests: int, min_seconds: float
) -> tuple[float, int, int]:
    """Milliseconds of the child's CPU per request, the prompt tokens the engine saw, and the
    number of requests sent (at least `min_requests`, and for at least `min_seconds`)."""
    url = child.url + path_of(kind)
    async with aiohttp.ClientSession() as session:
        for _ in range(WARMUP):
            answer = await post(session, url, payload)
        before = cpu_seconds(child.proc.pid)
        started, count = time.monotonic(), 0
        while (
            count < min_requests or time.monotonic() - started < min_seconds
        ) and count < MAX_REQUESTS:
            answer = await post(session, url, payload)
            count += 1
        spent = cpu_seconds(child.proc.pid) - before
    usage = answer["usage"]
    assert isinstance(usage, dict)
    return spent * 1000 / count, int(usage["prompt_tokens"]), count


async def health_latencies(url: str, stop: asyncio.Event) -> list[float]:
    out: list[float] = []
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            start = time.perf_counter()
            async with session.get(url + "/health") as resp:
                await resp.read()
            out.append((time.perf_counter() - start) * 1000)
            await asyncio.sleep(POLL_INTERVAL_S)
    return out


async def loop_stall(
    gateway: Child, kind: str, payload: bytes, count: int, idle_s: float
) -> tuple[list[float], list[float]]:
    """/health latencies with the gateway idle, then while `count` requests are admitted."""
    stop = asyncio.Event()
    poller = asyncio.create_task(health_latencies(gateway.url, stop))
    await asyncio.sleep(idle_s)
    stop.set()
    idle = await poller
    stop = asyncio.Event()
    poller = asyncio.create_task(health_latencies(gateway.url, stop))
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            await post(session, gateway.url + path_of(kind), payload)
    stop.set()
    busy = await poller
    return idle, busy


def describe(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"n={len(ordered):4d}  median {statistics.median(ordered):6.2f} ms  "
        f"p99 {p99:7.2f} ms  max {ordered[-1]:7.2f} ms"
    )


async def run(scale: float) -> None:
    texts = {size: prompt_text(size) for size in SIZES}
    with tempfile.TemporaryDirectory(prefix="admission-bench-") as tmp:
        workdir = Path(tmp)
        emulator = start_emulator(workdir)
        with running([emulator]):
            gateway = start_gateway("gateway", emulator.url, workdir)
            relay = start_relay(emulator.url, workdir)
            rows = []
            seconds = ROW_SECONDS * scale
            stall_count = max(5, round(STALL_REQUESTS * scale))
            with running([gateway, relay]):
                for size in SIZES:
                    for kind in ("completion", "chat"):
                        payload = body(kind, texts[size])
                        gw, tokens, count = await cpu_per_request(
                            gateway, kind, payload, MIN_REQUESTS, seconds
                        )
                        rl, _, _ = await cpu_per_request(relay, kind, payload, count, 0)
                        rows.append([size, kind, tokens, len(payload), count, gw, rl])
                stalls = {
                    "gateway": await loop_stall(
                        gateway, "chat", body("chat", texts[30_000]), stall_count, idle_s=2.0
                    )
                }
            for row in rows:
                size, kind, tokens = row[0], row[1], row[2]
                exact = start_gateway(
                    f"exact-{size}-{kind}", emulator.url, workdir, max_prompt_tokens=tokens
                )
                with running([exact]):
                    ex, _, _ = await cpu_per_request(
                        exact, kind, body(kind, texts[size]), row[4], 0
                    )
                    if size == 30_000 and kind == "chat":
                        stalls["exact"] = await loop_stall(
                            exact, kind, body(kind, texts[size]), stall_count, idle_s=2.0
                        )
                row.append(ex)
    print()
    print(
        "Event loop: GET /health every 20 ms, idle, then while 30,000-token chats are "
        "admitted back to back:"
    )
    for name, (idle, busy) in stalls.items():
        print(f"  {name:<8} idle:      {describe(idle)}")
        print(f"  {name:<8} admitting: {describe(busy)}")
    print()
    print("CPU time per request (ms), one request at a time, max_tokens 1:")
    header = (
        f"{'prompt':>7} {'kind':<10} {'tokens':>7} {'bytes':>8} {'reqs':>5} "
        f"{'relay':>7} {'gateway':>8} {'exact':>7} {'gw/relay':>9} {'exact/relay':>12}"
    )
    print(header)
    print("-" * len(header))
    for size, kind, tokens, nbytes, count, gw, rl, ex in rows:
        ratios = f"{gw / rl:>9.1f} {ex / rl:>12.1f}" if rl > 0 else f"{'n/a':>9} {'n/a':>12}"
        print(
            f"{size:>7} {kind:<10} {tokens:>7} {nbytes:>8} {count:>5} {rl:>7.2f} {gw:>8.2f} "
            f"{ex:>7.2f} {ratios}"
        )
    print()
    print(
        "relay: bare aiohttp relay; gateway: shipped policy (byte bound when it settles the "
        "decision); exact: every prompt tokenized (max_prompt_tokens just above it)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply the number of requests per row"
    )
    parser.add_argument("--relay", nargs=2, metavar=("PORT", "UPSTREAM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.relay:
        asyncio.run(relay_main(int(args.relay[0]), args.relay[1]))
        return
    if not (MODEL_DIR / "tokenizer.json").is_file():
        sys.exit("models/tiny is missing: run `make model` first")
    asyncio.run(run(args.scale))


if __name__ == "__main__":
    main()
