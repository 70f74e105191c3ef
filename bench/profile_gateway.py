"""Where the gateway's time goes under load: py-spy attached to a running vllm-guard while wrk
sends it non-streamed (or streamed) chats through the relay bench's fast fake upstream.

    .venv/bin/python bench/profile_gateway.py [--tokens 100] [--stream] [--seconds 20]
    (or: make profile)

Same setup as one cell of bench/relay_matrix.py (gateway on core 0, wrk and upstream on core 1,
concurrency 64). py-spy samples the gateway (`--nonblocking`, so the gateway is not paused to
be read, `--gil` off: every thread) for --seconds while wrk runs a little longer. Writes:

- bench/results/profile-<cell>.svg: the flame graph;
- bench/results/profile-<cell>.txt: the summary the next person optimising reads first: the
  project's functions with the most samples on the stack (inclusive), all functions by samples
  at the top of the stack (self), both as
  a share of all samples, and the share by area (the gateway's own modules, aiohttp, JSON,
  logging, tokenizer and templates, asyncio, the rest).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procs import ROOT, machine, running
from relay_matrix import (
    RELAY_CORE,
    Cell,
    body,
    lua_script,
    prompt_text,
    run_wrk,
    start_guard,
    start_upstream,
)

RESULTS = ROOT / "bench" / "results"
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
AREAS = (
    ("gateway (vllm-guard's own code)", ("gateway/",)),
    ("engine/ tokenization and templates", ("engine/", "tokenizers/", "jinja2/", "markupsafe/")),
    ("json (stdlib)", ("json/",)),
    ("logging (structlog)", ("structlog/",)),
    ("pydantic", ("pydantic/", "pydantic_core/")),
    ("aiohttp client (to the engine)", ("aiohttp/client", "aiohttp/connector")),
    ("aiohttp server, HTTP and streams", ("aiohttp/", "multidict/", "yarl/")),
    ("asyncio event loop and sockets", ("asyncio/", "selectors.py", "socket.py")),
)
"""Areas by the start of a frame's file path (as `short` gives it), most specific first."""


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        sys.exit("py-spy is missing: `make profile` installs it (the bench extra)")
    return found


def record(pid: int, seconds: int, out: Path, fmt: str) -> None:
    argv = [
        py_spy(),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(seconds),
        "--rate",
        "250",
        "--nonblocking",
        "--format",
        fmt,
        "--output",
        str(out),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"py-spy failed: {done.stderr[-2000:]}")


def parse_frame(frame: str) -> tuple[str, str]:
    """(function, file) of one py-spy frame, `func (file.py:12)`."""
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip(), ""
    return match["func"], match["file"]


def area_of(file: str) -> str | None:
    path = short(file)
    for name, prefixes in AREAS:
        if path.startswith(prefixes):
            return name
    return None


def summarise(raw: Path, top: int = 25) -> str:
    """Inclusive and self shares per function, and the self share per area."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [parse_frame(f) for f in stack.split(";")]
        named = [f"{func} ({short(file)})" for func, file in frames]
        for name in {n for n, (_, file) in zip(named, frames, strict=True) if ours(file)}:
            inclusive[name] += count
        if named:
            own[named[-1]] += count
        # Self time by area: the innermost frame that belongs to a known area.
        leaf_area = next(
            (a for _, file in reversed(frames) if (a := area_of(file)) is not None), "other"
        )
        areas[leaf_area] += count
    if total == 0:
        return "no samples\n"

    def table(counter: collections.Counter[str]) -> list[str]:
        return [f"  {n / total * 100:5.1f}%  {name}" for name, n in counter.most_common(top)]

    lines = [f"{total} samples", "", "Self time by area (innermost frame of a known area):"]
    lines += [f"  {n / total * 100:5.1f}%  {name}" for name, n in areas.most_common()]
    lines += ["", f"Top {top} functions of gateway/ and engine/, inclusive (on the stack):"]
    lines += table(inclusive)
    lines += ["", f"Top {top} functions, self (top of the stack):"]
    lines += table(own)
    return "\n".join(lines) + "\n"


def ours(file: str) -> bool:
    """A frame of the project's own code."""
    return short(file).startswith(("gateway/", "engine/"))


def short(file: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", str(ROOT) + "/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    cell = Cell(args.stream, args.concurrency, args.tokens)
    name = f"{'stream' if cell.stream else 'plain'}-c{cell.concurrency}-{cell.tokens}"
    started = datetime.datetime.now(datetime.UTC)
    about = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="profile-") as tmp:
        workdir = Path(tmp)
        body_file = workdir / "body.json"
        body_file.write_bytes(body(cell, prompt_text(cell.tokens)))
        script = lua_script(workdir / "post.lua", body_file)
        upstream = start_upstream(workdir)
        with running(upstream):
            guard = start_guard(upstream.url, workdir)
            with running(guard):
                run_wrk(guard.url, "/v1/chat/completions", script, cell.concurrency, 2)
                wrk_out: list[str] = []
                load = threading.Thread(
                    target=lambda: wrk_out.append(
                        run_wrk(
                            guard.url,
                            "/v1/chat/completions",
                            script,
                            cell.concurrency,
                            2 * args.seconds + 6,
                        )
                    )
                )
                load.start()
                raw = workdir / "profile.txt"
                record(guard.pid, args.seconds, raw, "raw")
                record(guard.pid, args.seconds, args.out / f"profile-{name}.svg", "flamegraph")
                load.join()
        summary = summarise(raw)
    text = (
        f"py-spy profile of vllm-guard (bench/profile_gateway.py, `make profile`), "
        f"{started:%Y-%m-%d %H:%M} UTC, on {about}\n"
        f"load: wrk -c{cell.concurrency}, {'streamed' if cell.stream else 'non-streamed'} chat, "
        f"{cell.tokens}-token prompt, no max_tokens; gateway on core {RELAY_CORE}; "
        f"{args.seconds} s at 250 Hz\n\n" + summary
    )
    (args.out / f"profile-{name}.txt").write_text(text)
    print(text)
    print(wrk_out[0] if wrk_out else "")


if __name__ == "__main__":
    main()
