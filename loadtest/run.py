"""`make loadtest`: the emulator behind the gateway at a realistic pace, locust in front, then
everything stopped by PID and the verdict as the exit status.

    .venv/bin/python loadtest/run.py [--duration 60] [--users 16] [--poison MARKER]
    .venv/bin/python loadtest/run.py --host http://127.0.0.1:8080   # a stack already running
    .venv/bin/python loadtest/run.py --ui                           # locust's web UI

Without --host it writes a gateway configuration for the run (a temporary folder) in the
supervised shape: the gateway starts the emulator (`python -m engine.emulator`, the tiny model's
tokenizer, a 4,096-token window, `--ttft-ms` and `--tokens-per-second` as given, `--die-on`
the poison marker when one is given), watches it and restarts it when it dies. Locust runs
headless for --duration seconds with --users users (loadtest/locustfile.py), lets the users
finish the request in hand, and prints its summary. The gateway is then stopped with SIGTERM
(it stops its engine); its log is searched for `gateway_bug` lines.

Exit status: locust's (1 on any unexpected status, unanswered request or empty run), or 1 when
the gateway logged a bug; 2 when the stack would not start.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from procs import (  # noqa: E402 (bench/procs.py, beside this script's folder)
    MODEL_DIR,
    Child,
    free_port,
    gateway_config,
    rss_bytes,
    start_gateway,
)

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
MAX_MODEL_LEN = 4096
STOP_TIMEOUT_S = 30
"""Users finish the request in hand for up to this long when the run time is over."""


def start_stack(args: argparse.Namespace, workdir: Path) -> Child:
    engine_port = free_port()
    emulator = [
        sys.executable,
        "-m",
        "engine.emulator",
        "--host",
        "127.0.0.1",
        "--port",
        str(engine_port),
        "--served-model-name",
        "tiny",
        "--tokenizer",
        str(MODEL_DIR),
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--ttft-ms",
        str(args.ttft_ms),
        "--tokens-per-second",
        str(args.tokens_per_second),
        "--exit-code",
        "1",
    ]
    if args.poison:
        emulator += ["--die-on", args.poison]
    config = gateway_config(
        free_port(),
        {
            "url": f"http://127.0.0.1:{engine_port}",
            "command": emulator,
            "startup_probe_interval_s": 0.2,
            "restart_backoff_s": 0.2,
            "max_restarts": 1000,
        },
        admin_port=free_port(),
        model={"default_max_tokens": 128, "max_tokens_limit": 1024},
        max_body_bytes=4 << 20,
    )
    return start_gateway("gateway", config, workdir, timeout=120)


def locust_argv(args: argparse.Namespace, host: str, summary: Path) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--host",
        host,
        "--summary-json",
        str(summary),
        "--model",
        args.model,
    ]
    if args.poison:
        argv += ["--poison", args.poison]
    if args.ui:
        return [*argv, "--web-host", "127.0.0.1", "--web-port", str(args.web_port)]
    return [
        *argv,
        "--headless",
        "--only-summary",
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate or max(1, args.users // 2)),
        "--run-time",
        f"{args.duration}s",
        "--stop-timeout",
        str(STOP_TIMEOUT_S),
        "--loglevel",
        "WARNING",
    ]


def sample_rss(
    pid: int, every_s: float, out: list[tuple[float, int]], stop: threading.Event
) -> None:
    start = time.monotonic()
    while not stop.wait(every_s):
        try:
            out.append((time.monotonic() - start, rss_bytes(pid)))
        except OSError:
            return


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=60, help="seconds of load")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--spawn-rate", type=float, default=0, help="users/s (default users/2)")
    parser.add_argument("--host", default="", help="an endpoint already running: start nothing")
    parser.add_argument("--ui", action="store_true", help="locust's web UI instead of headless")
    parser.add_argument("--web-port", type=int, default=8089)
    parser.add_argument("--poison", default="", help="a marker the emulator dies on")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--tokens-per-second", type=float, default=50.0)
    parser.add_argument("--ttft-ms", type=float, default=100.0)
    parser.add_argument("--summary-json", type=Path, help="keep locust's summary here")
    parser.add_argument(
        "--rss", action="store_true", help="report the gateway's memory at start and end"
    )
    args = parser.parse_args()
    # SIGTERM (a CI timeout, `kill PID`) unwinds like Ctrl-C: locust and the gateway stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not args.host and not (MODEL_DIR / "tokenizer.json").is_file():
        print("models/tiny is missing: run `make model` first", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="loadtest-") as tmp:
        workdir = Path(tmp)
        summary = args.summary_json or workdir / "summary.json"
        gateway: Child | None = None
        host = args.host
        if not host:
            try:
                gateway = start_stack(args, workdir)
            except RuntimeError as exc:
                print(f"the stack did not start: {exc}", file=sys.stderr)
                return 2
            host = gateway.url
            print(f"gateway {host} (pid {gateway.pid}) in front of the emulator", flush=True)
        samples: list[tuple[float, int]] = []
        stop = threading.Event()
        sampler = None
        if args.rss and gateway is not None:
            samples.append((0.0, rss_bytes(gateway.pid)))
            sampler = threading.Thread(
                target=sample_rss, args=(gateway.pid, 5.0, samples, stop), daemon=True
            )
            sampler.start()
        if args.ui:
            print(f"locust's web UI: http://127.0.0.1:{args.web_port} (Ctrl-C to stop)", flush=True)
        try:
            timeout = None if args.ui else args.duration + STOP_TIMEOUT_S + 120
            rc = subprocess.run(
                locust_argv(args, host, summary), timeout=timeout, check=False
            ).returncode
        except subprocess.TimeoutExpired:
            print("locust did not finish in time", file=sys.stderr)
            rc = 1
        except KeyboardInterrupt:
            rc = 130
        finally:
            stop.set()
            if gateway is not None:
                final_rss = rss_bytes(gateway.pid) if gateway.proc.poll() is None else 0
                gateway.stop()
        if gateway is not None:
            bugs, failures = read_log(gateway.log)
            print(
                f"gateway log: {len(bugs)} gateway_bug lines, {failures} engine failures",
                flush=True,
            )
            if bugs:
                print("\n".join(bugs[:5]), file=sys.stderr)
                rc = rc or 1
            if args.rss and samples:
                report_rss(samples, final_rss)
        if args.summary_json is None and summary.exists():
            totals = json.loads(summary.read_text())
            print(
                f"loadtest: {totals['requests']} requests, {totals['unexpected']} unexpected, "
                f"{totals['unanswered']} unanswered; exit {rc}",
                flush=True,
            )
    return rc


def read_log(path: Path) -> tuple[list[str], int]:
    """The gateway's `gateway_bug` lines and how many times its engine failed."""
    bugs: list[str] = []
    failures = 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not isinstance(event, dict):
            continue
        if event.get("event") == "gateway_bug":
            bugs.append(line)
        elif event.get("event") == "engine_state" and event.get("to") == "failed":
            failures += 1
    return bugs, failures


def report_rss(samples: list[tuple[float, int]], final: int) -> None:
    """The gateway's memory after warm-up (the first sample past 10% of the run) and at the end."""
    end_t = samples[-1][0]
    warm = next((rss for t, rss in samples if t >= 0.1 * end_t), samples[0][1])
    end = final or samples[-1][1]
    peak = max(rss for _, rss in samples)
    growth = (end - warm) / warm * 100 if warm else 0.0
    print(
        f"gateway RSS: {samples[0][1] / 2**20:.1f} MiB at start, {warm / 2**20:.1f} MiB after "
        f"warm-up, {end / 2**20:.1f} MiB at the end (peak {peak / 2**20:.1f} MiB): "
        f"{growth:+.1f}% since warm-up",
        flush=True,
    )
    print(f"gateway RSS by minute, MiB: {by_minute(samples)}", flush=True)


def by_minute(samples: list[tuple[float, int]]) -> str:
    """The last sample of each minute of the run, so a plateau reads apart from a climb."""
    last: dict[int, int] = {}
    for t, rss in samples:
        last[int(t // 60)] = rss
    return ", ".join(f"{last[m] / 2**20:.1f}" for m in sorted(last))


if __name__ == "__main__":
    sys.exit(main())
