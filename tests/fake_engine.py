"""A fake engine for supervision tests: a tiny aiohttp app run as a real subprocess.

    python tests/fake_engine.py --port PORT [--child] [--child-ignores-term] [--ignore-term]
                                [--never-ready]

It serves /health, /v1/models (a base model and a LoRA adapter), /v1/completions and /metrics
(`vllm:generation_tokens_total`), and is switched at run time through POST /_control with any of
{"health": 503, "hang": true, "busy": true, "metrics": false, "exit": 0, "print": "text"}.
GET /_info tells its pid and its child's. `--child` starts a child process in the same process
group (as vLLM starts its engine core), which outlives the fake when it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from typing import Any

from aiohttp import web

MODEL = "fake"
LORA = "fake-lora"
MAX_MODEL_LEN = 512
CHILD_CODE = (
    "import signal, sys, time\n"
    "if sys.argv[1] == 'ignore': signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "time.sleep(120)\n"
)


def build_app(state: dict[str, Any]) -> web.Application:
    async def health(request: web.Request) -> web.Response:
        return web.Response(status=state["health"])

    async def models(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": MODEL,
                        "object": "model",
                        "root": MODEL,
                        "parent": None,
                        "max_model_len": MAX_MODEL_LEN,
                    },
                    {"id": LORA, "object": "model", "root": "/adapters/x", "parent": MODEL},
                ],
            }
        )

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        if state["never_ready"]:
            return web.json_response({"error": {"message": "loading"}}, status=503)
        if state["hang"]:
            await asyncio.Event().wait()  # wedged: no bytes, no tokens, forever
        state["tokens"] += 1
        return web.json_response(
            {
                "id": "cmpl-1",
                "object": "text_completion",
                "model": body.get("model"),
                "choices": [{"index": 0, "text": " pong"}],
            }
        )

    async def metrics(request: web.Request) -> web.Response:
        if not state["metrics"]:
            raise web.HTTPNotFound
        return web.Response(
            text=(
                "# HELP vllm:generation_tokens_total Number of generation tokens processed.\n"
                "# TYPE vllm:generation_tokens_total counter\n"
                f'vllm:generation_tokens_total{{engine="0",model_name="{MODEL}"}} '
                f"{state['tokens']}\n"
                f'vllm:generation_tokens_created{{engine="0",model_name="{MODEL}"}} 1.7e9\n'
            )
        )

    async def control(request: web.Request) -> web.Response:
        changes = await request.json()
        if "print" in changes:
            print(changes.pop("print"), flush=True)
        if "exit" in changes:
            asyncio.get_running_loop().call_later(0.05, os._exit, int(changes.pop("exit")))
        state.update(changes)
        return web.json_response({"ok": True})

    async def info(request: web.Request) -> web.Response:
        return web.json_response({"pid": os.getpid(), "child_pid": state["child_pid"]})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/_control", control)
    app.router.add_get("/_info", info)
    return app


async def busy_loop(state: dict[str, Any]) -> None:
    """While busy, tokens move (as for long generations that send nothing yet)."""
    while True:
        await asyncio.sleep(0.05)
        if state["busy"]:
            state["tokens"] += 1


async def serve(args: argparse.Namespace) -> None:
    state: dict[str, Any] = {
        "health": 200,
        "hang": False,
        "busy": False,
        "metrics": True,
        "tokens": 0,
        "never_ready": args.never_ready,
        "child_pid": None,
    }
    if args.child:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD_CODE, "ignore" if args.child_ignores_term else "default"]
        )
        state["child_pid"] = child.pid
    runner = web.AppRunner(build_app(state), handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    print(f"fake engine listening on http://127.0.0.1:{args.port}", flush=True)
    print("fake engine ready for probes", file=sys.stderr, flush=True)
    stopped = asyncio.Event()
    if not args.ignore_term:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    ticker = asyncio.create_task(busy_loop(state))
    await stopped.wait()
    ticker.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await ticker
    print("fake engine stopping on SIGTERM", flush=True)
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--child-ignores-term", action="store_true")
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--never-ready", action="store_true")
    args = parser.parse_args()
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()


# How the tests run the fake (their other helpers are in tests/helpers.py).

FAKE = os.path.abspath(__file__)


def fake_argv(port: int, *flags: str) -> list[str]:
    return [sys.executable, FAKE, "--port", str(port), *flags]
