"""Ten minutes at 64 users: does the gateway's memory stay flat?

    .venv/bin/python bench/soak.py [--minutes 10] [--users 64]      (or: make soak)

Runs the load test (loadtest/run.py: the emulator behind a supervised gateway, locust's mix,
malformed bodies and over-long prompts included) for --minutes with --users users, sampling the
gateway's resident memory (VmRSS from /proc/PID/status) every 5 s. Prints the memory at start,
after warm-up (the first sample past a tenth of the run) and at the end, and the growth since
warm-up. Exit status: the load test's, or 1 when the memory grew by --max-growth percent or more
(the goal: under 10%).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--max-growth", type=float, default=10.0, help="percent")
    args = parser.parse_args()
    argv = [
        sys.executable,
        str(ROOT / "loadtest" / "run.py"),
        "--duration",
        str(round(args.minutes * 60)),
        "--users",
        str(args.users),
        "--rss",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=ROOT)
    print(done.stdout)
    print(done.stderr[-3000:], file=sys.stderr)
    match = re.search(r"([+-][\d.]+)% since warm-up", done.stdout)
    if not match:
        print("soak: no memory figures (did the stack start?)", file=sys.stderr)
        return done.returncode or 1
    growth = float(match[1])
    verdict = "flat" if growth < args.max_growth else f"grew past {args.max_growth:g}%"
    print(f"soak: {args.minutes:g} min at {args.users} users, gateway memory {verdict}")
    return done.returncode or (0 if growth < args.max_growth else 1)


if __name__ == "__main__":
    sys.exit(main())
