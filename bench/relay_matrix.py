"""What a relay costs, side by side in one run: direct to the upstream, a bare aiohttp relay
(the floor for Python), nginx (the floor for a relay, when installed) and vllm-guard with a
realistic policy, all in front of the same fast fake OpenAI upstream.

    .venv/bin/python bench/relay_matrix.py          # quick: a few minutes (make bench)
    .venv/bin/python bench/relay_matrix.py --full   # the whole matrix (make bench BENCH=full)
    .venv/bin/python bench/relay_matrix.py --cells plain-64-100,stream-64-100 --out /tmp/x
                                                    # only these cells (a targeted before/after)

For each cell (streamed or not, concurrency, prompt size), each relay gets `--repeats` runs of
`--seconds` of Debian's `wrk` (one thread, a Lua script that POSTs the cell's body), relays taken
in turn within each repeat so that the machine's noise falls on all of them alike. Each run
reads: requests/s and latency p50/p99 from wrk's summary, and the relay's CPU time (user +
system, all threads, from /proc/PID/stat) divided by the requests wrk completed. The table gives
the median of the repeats and their spread (min-max), and the ratios of the medians to the bare
relay and to nginx. A run with an unexpected answer (a non-2xx, a socket error) is an error.

Cores: the relay runs on core 0 (taskset), wrk and the upstream on core 1, so that the load
generator does not steal the relay's core. On a machine shared with other work the absolute
figures move between runs; the ratios, measured side by side, move much less.

Bodies: a chat request (`messages`, one user turn, no `max_tokens`, so that the gateway fills
its bounded default as it would for most clients) whose content is about 100, 2,000 or 30,000
tokens with the tiny model's tokenizer; streamed cells add `"stream": true` and ask for usage.
The upstream streams 64 content events 1 ms apart. vllm-guard runs the shipped defaults with the
tiny tokenizer read locally (token_source: local), isolation on, its JSON log line per request
written to a file. nginx runs as one process (master_process off), keep-alive to the upstream,
proxy_buffering off, its access log buffered to a file.

Writes bench/results/relay-{quick,full}.{md,json,png} (the README shows the Markdown table and
the plot).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procs import (
    MODEL_DIR,
    ROOT,
    Child,
    cpu_seconds,
    free_port,
    gateway_config,
    machine,
    pinned,
    running,
    spawn,
    start_gateway,
)

RESULTS = ROOT / "bench" / "results"
RELAY_CORE, LOAD_CORE = 0, 1
CHUNKS = 64
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
WRK = shutil.which("wrk")


@dataclass(frozen=True)
class Cell:
    stream: bool
    concurrency: int
    tokens: int

    @property
    def label(self) -> str:
        return f"{'stream' if self.stream else 'plain'} c={self.concurrency} {self.tokens:,} tok"


def parse_cells(text: str) -> tuple[Cell, ...]:
    """`--cells`: comma-separated labels `plain|stream-CONCURRENCY-TOKENS`, e.g.
    `plain-64-100,stream-64-100`."""
    cells = []
    for label in text.split(","):
        match = re.fullmatch(r"(plain|stream)-(\d+)-(\d+)", label.strip())
        if match is None:
            raise argparse.ArgumentTypeError(
                f"not a cell: {label!r} (expected plain|stream-CONCURRENCY-TOKENS)"
            )
        cells.append(Cell(match[1] == "stream", int(match[2]), int(match[3])))
    return tuple(cells)


QUICK = (
    Cell(False, 64, 100),
    Cell(False, 64, 2_000),
    Cell(True, 64, 100),
    Cell(False, 1, 100),
)
FULL = tuple(
    Cell(stream, conc, tokens)
    for stream in (False, True)
    for conc in (1, 16, 64)
    for tokens in (100, 2_000, 30_000)
)


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float
    requests: int


@dataclass
class Result:
    cell: Cell
    relay: str
    runs: list[Run] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return float(statistics.median(float(getattr(r, attr)) for r in self.runs))

    def spread(self, attr: str) -> tuple[float, float]:
        values = [getattr(r, attr) for r in self.runs]
        return min(values), max(values)


# -- prompts and bodies ------------------------------------------------------------------------


def prompt_text(tokens: int) -> str:
    """About `tokens` tokens of varied text with the tiny tokenizer (bench/admission_cost.py's
    word list, so the two benches send the same kind of text)."""
    from admission_cost import prompt_text as text_of

    return text_of(tokens)


def body(cell: Cell, text: str) -> bytes:
    payload: dict[str, object] = {
        "model": "tiny",
        "messages": [{"role": "user", "content": text}],
        "temperature": 0.7,
    }
    if cell.stream:
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}
    return json.dumps(payload).encode()


def lua_script(path: Path, body_file: Path) -> Path:
    """A wrk script that POSTs the body in `body_file` (read once per thread)."""
    path.write_text(
        f"""local f = assert(io.open("{body_file}", "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
"""
    )
    return path


# -- the relays --------------------------------------------------------------------------------


def start_upstream(workdir: Path) -> Child:
    port = free_port()
    return spawn(
        "upstream",
        pinned(
            LOAD_CORE,
            [
                sys.executable,
                str(ROOT / "bench" / "fake_upstream.py"),
                str(port),
                "--chunks",
                str(CHUNKS),
            ],
        ),
        f"http://127.0.0.1:{port}",
        "/health",
        workdir,
    )


def start_bare(upstream: str, workdir: Path) -> Child:
    port = free_port()
    return spawn(
        "bare",
        pinned(
            RELAY_CORE, [sys.executable, str(ROOT / "bench" / "bare_relay.py"), str(port), upstream]
        ),
        f"http://127.0.0.1:{port}",
        "/health",
        workdir,
    )


def start_nginx(upstream: str, workdir: Path) -> Child:
    assert NGINX is not None
    port = free_port()
    upstream_port = upstream.rsplit(":", 1)[1]
    root = workdir / "nginx"
    root.mkdir()
    conf = root / "nginx.conf"
    conf.write_text(
        f"""daemon off;
master_process off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {root}/access.log combined buffer=64k flush=1s;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    upstream engine {{
        server 127.0.0.1:{upstream_port};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        client_max_body_size 64m;
        client_body_buffer_size 1m;
        location = /health {{ return 200 "ok"; }}
        location / {{
            proxy_pass http://engine;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering on;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""
    )
    return spawn(
        "nginx",
        pinned(
            RELAY_CORE, [NGINX, "-c", str(conf), "-p", str(root), "-e", str(root / "error.log")]
        ),
        f"http://127.0.0.1:{port}",
        "/health",
        workdir,
    )


def start_guard(upstream: str, workdir: Path) -> Child:
    config = gateway_config(
        free_port(),
        {"url": upstream},
        admin_port=free_port(),
    )
    return start_gateway("vllm-guard", config, workdir, core=RELAY_CORE)


# -- wrk ---------------------------------------------------------------------------------------

_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match[1]) * _UNIT[match[2]]


def parse_wrk(out: str) -> tuple[int, float, float, float, list[str]]:
    """(requests, requests/s, p50 ms, p99 ms, problems) from wrk's --latency summary."""
    problems: list[str] = []
    requests = int(re.search(r"(\d+) requests in", out)[1])  # type: ignore[index]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out)[1])  # type: ignore[index]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out)[1])  # type: ignore[index]
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        problems.append(f"{match[1]} non-2xx answers")
    if match := re.search(r"Socket errors: (.*)", out):
        problems.append(f"socket errors: {match[1]}")
    return requests, rps, p50, p99, problems


def run_wrk(url: str, path: str, script: Path, concurrency: int, seconds: float) -> str:
    argv = pinned(
        LOAD_CORE,
        [
            WRK or "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{seconds:g}s",
            "--timeout",
            "30s",
            "--latency",
            "-s",
            str(script),
            url + path,
        ],
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return done.stdout


def measure(child: Child, cell: Cell, script: Path, seconds: float, warmup: bool = False) -> Run:
    """One wrk run against `child`; a warm-up only has to get no wrong answer (on a busy
    machine a one-second warm-up may complete nothing)."""
    before = cpu_seconds(child.pid)
    out = run_wrk(child.url, "/v1/chat/completions", script, cell.concurrency, seconds)
    spent = cpu_seconds(child.pid) - before
    requests, rps, p50, p99, problems = parse_wrk(out)
    if problems or (requests == 0 and not warmup):
        raise RuntimeError(
            f"{child.name} {cell.label}: {'; '.join(problems) or 'no request answered'}\n"
            f"{out}\n{child.tail()}"
        )
    return Run(rps, p50, p99, spent * 1e6 / max(requests, 1), requests)


# -- the matrix --------------------------------------------------------------------------------


def run_matrix(cells: Iterable[Cell], repeats: int, seconds: float) -> list[Result]:
    cells = list(cells)
    texts = {tokens: prompt_text(tokens) for tokens in {c.tokens for c in cells}}
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="relay-matrix-") as tmp:
        workdir = Path(tmp)
        upstream = start_upstream(workdir)
        with running(upstream):
            relays: list[Child] = [upstream]
            relays.append(start_bare(upstream.url, workdir))
            if NGINX:
                relays.append(start_nginx(upstream.url, workdir))
            relays.append(start_guard(upstream.url, workdir))
            with running(*relays[1:]):
                for n, cell in enumerate(cells):
                    body_file = workdir / f"body-{n}.json"
                    body_file.write_bytes(body(cell, texts[cell.tokens]))
                    script = lua_script(workdir / f"post-{n}.lua", body_file)
                    row = {child.name: Result(cell, child.name) for child in relays}
                    for child in relays:  # warm-up: connections, caches, the JIT-less paths
                        measure(child, cell, script, 1, warmup=True)
                    for rep in range(repeats):
                        for child in relays:
                            row[child.name].runs.append(measure(child, cell, script, seconds))
                        print(
                            f"  {cell.label:<24} repeat {rep + 1}/{repeats}: "
                            + ", ".join(
                                f"{name} {r.runs[-1].cpu_us:.0f} µs" for name, r in row.items()
                            ),
                            flush=True,
                        )
                    results.extend(row.values())
    return results


# -- reporting ---------------------------------------------------------------------------------

NAMES = {
    "upstream": "direct to the upstream",
    "bare": "bare aiohttp relay",
    "nginx": "nginx",
    "vllm-guard": "**vllm-guard**",
}


def _fmt(value: float, spread: tuple[float, float], digits: int = 0) -> str:
    return f"{value:,.{digits}f} ({spread[0]:,.{digits}f}-{spread[1]:,.{digits}f})"


def markdown(results: list[Result], header: str) -> str:
    lines = [header, ""]
    lines.append(
        "| cell | relay | CPU µs / request | ÷ bare | ÷ bare, per repeat | ÷ nginx | requests/s "
        "| p50 ms | p99 ms |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    by_cell: dict[Cell, dict[str, Result]] = {}
    for r in results:
        by_cell.setdefault(r.cell, {})[r.relay] = r
    for cell, row in by_cell.items():
        bare = row["bare"].median("cpu_us")
        nginx = row["nginx"].median("cpu_us") if "nginx" in row else None
        for name, r in row.items():
            cpu = r.median("cpu_us")
            relay = name != "upstream"
            ratio_bare = f"{cpu / bare:.2f}" if relay else ""
            paired = paired_ratios(r, row["bare"]) if relay and name != "bare" else []
            ratio_paired = (
                _fmt(statistics.median(paired), (min(paired), max(paired)), 2) if paired else ""
            )
            ratio_nginx = f"{cpu / nginx:.2f}" if relay and nginx else ""
            cpu_text = _fmt(cpu, r.spread("cpu_us"))
            if not relay:
                cpu_text += " (the upstream's)"
            lines.append(
                f"| {cell.label} | {NAMES[name]} | {cpu_text} | {ratio_bare} | {ratio_paired} "
                f"| {ratio_nginx} "
                f"| {_fmt(r.median('rps'), r.spread('rps'))} "
                f"| {_fmt(r.median('p50_ms'), r.spread('p50_ms'), 2)} "
                f"| {_fmt(r.median('p99_ms'), r.spread('p99_ms'), 2)} |"
            )
    chunk_lines = per_chunk(by_cell)
    if chunk_lines:
        lines += ["", "Streamed answers, per content chunk (64 a stream):", ""]
        lines += chunk_lines
    lines += [
        "",
        "Medians of the repeats, (min-max) over them. CPU: the relay process's user + system "
        "time over the requests wrk completed; for the direct row, the upstream's own. "
        "Ratios: medians over the bare relay's and nginx's in the same cell; per repeat: each "
        "repeat's CPU over the bare relay's in the same repeat (the relays' runs of a repeat "
        "follow one another), their median (min-max), which slow drifts of the machine move "
        "less.",
    ]
    return "\n".join(lines) + "\n"


def paired_ratios(relay: Result, bare: Result) -> list[float]:
    """Each repeat's CPU per request of `relay` over the bare relay's in the same repeat."""
    return [r.cpu_us / b.cpu_us for r, b in zip(relay.runs, bare.runs, strict=True) if b.cpu_us]


def per_chunk(by_cell: dict[Cell, dict[str, Result]]) -> list[str]:
    """For each streamed cell whose plain twin was measured: CPU per chunk, the whole stream
    over its chunks and the marginal cost of a chunk ((streamed - plain) / chunks)."""
    out: list[str] = []
    for cell, row in by_cell.items():
        if not cell.stream:
            continue
        plain = by_cell.get(Cell(False, cell.concurrency, cell.tokens))
        if not out:
            out.append(
                "| cell | relay | µs / chunk (whole stream) | marginal µs / chunk | ÷ bare |"
            )
            out.append("|---|---|---|---|---|")
        bare_marginal = None
        if plain:
            bare_marginal = (row["bare"].median("cpu_us") - plain["bare"].median("cpu_us")) / CHUNKS
        for name, r in row.items():
            if name == "upstream":
                continue
            whole = r.median("cpu_us") / CHUNKS
            marginal = (
                (r.median("cpu_us") - plain[name].median("cpu_us")) / CHUNKS if plain else None
            )
            ratio = f"{marginal / bare_marginal:.2f}" if marginal and bare_marginal else ""
            out.append(
                f"| {cell.label} | {NAMES[name]} | {whole:.1f} | "
                f"{'' if marginal is None else f'{marginal:.1f}'} | {ratio} |"
            )
    return out


COLORS = {"upstream": "tab:gray", "bare": "tab:blue", "nginx": "tab:green", "vllm-guard": "tab:red"}


def plot(results: list[Result], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(dict.fromkeys(r.cell for r in results))
    relays = [name for name in NAMES if any(r.relay == name for r in results)]
    index = {(r.cell, r.relay): r for r in results}
    fig, (ax_cpu, ax_rps) = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(cells)), 8))
    width = 0.8 / len(relays)
    for i, name in enumerate(relays):
        xs = [c + i * width for c in range(len(cells))]
        # The direct row's CPU is the upstream's, not a relay's: requests/s only.
        axes = ((ax_rps, "rps"),) if name == "upstream" else ((ax_cpu, "cpu_us"), (ax_rps, "rps"))
        for ax, attr in axes:
            meds = [index[(cell, name)].median(attr) for cell in cells]
            lows = [
                m - index[(cell, name)].spread(attr)[0] for m, cell in zip(meds, cells, strict=True)
            ]
            highs = [
                index[(cell, name)].spread(attr)[1] - m for m, cell in zip(meds, cells, strict=True)
            ]
            ax.bar(
                xs,
                meds,
                width,
                yerr=[lows, highs],
                capsize=2,
                color=COLORS[name],
                label=NAMES[name].strip("*"),
            )
    for ax, label in ((ax_cpu, "CPU µs per request (log)"), (ax_rps, "requests/s (log)")):
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cells))])
        ax.set_xticklabels([c.label for c in cells], rotation=20, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    ax_cpu.legend(fontsize=8)
    ax_rps.legend(fontsize=8)
    ax_cpu.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="every cell (about 20 minutes)")
    parser.add_argument(
        "--cells",
        type=parse_cells,
        default=None,
        help="only these cells, comma-separated plain|stream-CONCURRENCY-TOKENS labels "
        "(e.g. plain-64-100,stream-64-100); written as relay-cells.*",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=None, help="per run (4 quick, 5 full)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if WRK is None:
        sys.exit("wrk is not installed: run `make system` (scripts/install-system.sh)")
    if not (MODEL_DIR / "tokenizer.json").is_file():
        sys.exit("models/tiny is missing: run `make model` first")
    name = "cells" if args.cells else "full" if args.full else "quick"
    seconds = args.seconds or (5.0 if args.full else 4.0)
    started = datetime.datetime.now(datetime.UTC)
    about = machine()
    defaults = args.repeats == 3 and args.seconds is None and args.out == RESULTS and not args.cells
    command = (
        ("make bench BENCH=full" if args.full else "make bench")
        if defaults
        else " ".join(["python bench/relay_matrix.py", *sys.argv[1:]])
    )
    print(f"relay matrix ({name}): {about}", flush=True)
    cells = args.cells or (FULL if args.full else QUICK)
    results = run_matrix(cells, args.repeats, seconds)
    args.out.mkdir(parents=True, exist_ok=True)
    header = (
        f"Relay cost, {name} run of `{command}` (bench/relay_matrix.py), "
        f"{started:%Y-%m-%d %H:%M} UTC, on {about}; {args.repeats} repeats of {seconds:g} s "
        f"of wrk per relay and cell; relay on core {RELAY_CORE}, wrk and upstream on core "
        f"{LOAD_CORE}."
    )
    table = markdown(results, header)
    (args.out / f"relay-{name}.md").write_text(table)
    (args.out / f"relay-{name}.json").write_text(
        json.dumps(
            {
                "date": started.isoformat(),
                "machine": about,
                "command": command,
                "results": [
                    {
                        "stream": r.cell.stream,
                        "concurrency": r.cell.concurrency,
                        "tokens": r.cell.tokens,
                        "relay": r.relay,
                        "runs": [vars(run) for run in r.runs],
                    }
                    for r in results
                ],
            },
            indent=1,
        )
    )
    plot(
        results,
        args.out / f"relay-{name}.png",
        f"{command}, {started:%Y-%m-%d}, {about.split(', load')[0]}",
    )
    print()
    print(table)
    print(f"written: {args.out}/relay-{name}.md, .json, .png")


if __name__ == "__main__":
    main()
