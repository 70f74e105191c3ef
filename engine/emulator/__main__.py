"""`python -m engine.emulator`: serve the emulated vLLM engine until SIGTERM, or until it dies.

Prints `emulator listening on http://HOST:PORT` (flushed) once it accepts connections, so a
test that asked for `--port 0` can read the port. Exit status: 0 after SIGTERM/SIGINT;
`--exit-code` after an emulated engine death (`--on-death exit`) or a `--die-on` request.

As a process: `--child` starts a child in the same process group, as vLLM starts its
EngineCore, and leaves it running when the emulator exits (`--child-ignores-term`: the child
ignores SIGTERM too); `--ignore-term` makes an engine that a SIGTERM does not stop. With
`--control`, tests change health, hangs and the rest at run time (control.py).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from engine.emulator.app import EMULATOR, create_emulator_app
from engine.emulator.control import CONTROLS
from engine.emulator.settings import EmulatorSettings

SHUTDOWN_GRACE_S = 2.0
CHILD_CODE = (
    "import signal, sys, time\n"
    "if sys.argv[1] == 'ignore': signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "time.sleep(120)\n"
)
"""The stand-in for vLLM's EngineCore process: it only waits (at most two minutes)."""


def lora_module(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def parse_args(argv: Sequence[str] | None = None) -> tuple[EmulatorSettings, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m engine.emulator", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--served-model-name", nargs="+", action="extend", dest="names",
                   help="names the model answers to; the first is the default")  # fmt: skip
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--lora-modules", nargs="+", action="extend", type=lora_module, default=[],
                   metavar="NAME=PATH", help="LoRA adapters listed and served")  # fmt: skip
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--tokenizer", type=Path, help="HF model folder for exact token counts")
    p.add_argument("--ttft-ms", type=float, default=0.0)
    p.add_argument("--tokens-per-second", type=float, default=0.0, help="0: as fast as possible")
    p.add_argument("--latency-ms", type=float, default=0.0, help="extra delay on every request")
    p.add_argument("--startup-delay-s", type=float, default=0.0, help="wait before listening")
    p.add_argument("--multi-step-bug", action="store_true",
                   help="no max_tokens (or 0) kills the engine loop (kserve#3971)")  # fmt: skip
    p.add_argument("--on-death", choices=("stay", "exit"), default="stay")
    p.add_argument("--exit-code", type=int, default=0, help="status of an emulated exit")
    p.add_argument("--die-on", metavar="MARKER", help="a prompt with it ends the process")
    p.add_argument("--hang-on", metavar="MARKER", help="a prompt with it stalls generation")
    p.add_argument("--log-requests", action="store_true", help="access log on stdout")
    p.add_argument("--control", action="store_true", help="serve /_emulator/ (control.py)")
    p.add_argument("--child", action="store_true", help="start an EngineCore-like child")
    p.add_argument("--child-ignores-term", action="store_true", help="... that ignores SIGTERM")
    p.add_argument("--ignore-term", action="store_true", help="SIGTERM does not stop it")
    p.add_argument("--hold-tokenize-on", metavar="MARKER",
                   help="a /tokenize with it is held open until the process dies")  # fmt: skip
    p.add_argument("--hold-tokenize-once", metavar="FILE", type=Path,
                   help="hold once across restarts: the first hold creates FILE")  # fmt: skip
    p.add_argument("--no-completions", action="store_true",
                   help="do not serve /v1/completions (a chat-only server)")  # fmt: skip
    args = p.parse_args(argv)
    settings = EmulatorSettings(
        served_model_names=tuple(args.names or ("tiny",)),
        max_model_len=args.max_model_len,
        lora_modules=dict(args.lora_modules),
        max_num_seqs=args.max_num_seqs,
        tokenizer=args.tokenizer,
        ttft_ms=args.ttft_ms,
        tokens_per_second=args.tokens_per_second,
        latency_ms=args.latency_ms,
        multi_step_bug=args.multi_step_bug,
        on_death=args.on_death,
        exit_code=args.exit_code,
        die_on=args.die_on,
        hang_on=args.hang_on,
        log_requests=args.log_requests,
        control=args.control,
        serve_completions=not args.no_completions,
        hold_tokenize_on=args.hold_tokenize_on,
        hold_tokenize_once=args.hold_tokenize_once,
    )
    return settings, args


def start_child(ignores_term: bool) -> int:
    """Start the EngineCore stand-in in this process group; its pid."""
    code = [sys.executable, "-c", CHILD_CODE, "ignore" if ignores_term else "default"]
    return subprocess.Popen(code).pid


async def serve(settings: EmulatorSettings, args: argparse.Namespace, child_pid: int | None) -> int:
    """Serve until a signal (status 0) or an emulated engine exit (settings.exit_code)."""
    host, port = args.host, args.port
    app = create_emulator_app(settings)
    app[CONTROLS].child_pid = child_pid
    await asyncio.sleep(args.startup_delay_s)  # vLLM does not listen before its model is loaded
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        print(f"emulator listening on http://{host}:{runner.addresses[0][1]}", flush=True)
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT,) if args.ignore_term else (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopped.set)
        died = app[EMULATOR].core.exit_requested
        waits = [asyncio.create_task(stopped.wait()), asyncio.create_task(died.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()
        return settings.exit_code if died.is_set() else 0
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    settings, args = parse_args(argv)
    child_pid = start_child(args.child_ignores_term) if args.child else None
    if args.ignore_term:  # after the child started: it would inherit the disposition
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(asyncio.run(serve(settings, args, child_pid)))


if __name__ == "__main__":
    main()
