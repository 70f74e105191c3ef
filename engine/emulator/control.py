"""Run-time control of an emulated engine, for the tests that supervise it as a process.

Not part of vLLM's API: served only with `--control` (`EmulatorSettings.control`), under
`/_emulator/`, so the emulator answers nothing vLLM would not unless asked to.

    POST /_emulator/control  {"health": 503, "hang": true, "busy": true, "metrics": false,
                              "tokenize": 500, "exit": 0}   (any of them; answers {"ok": true})
    GET  /_emulator/info     {"pid": ..., "child_pid": ... or null}

- `health`: the status /health answers from now on (a dead engine loop still answers 503);
- `hang`: all generation stalls (true) or flows again (false), /health unchanged (vllm#39863);
- `busy`: the generation-token counter moves on its own, as it does while the engine works on
  long generations that have sent nothing yet (a stall that is not a wedge);
- `metrics`: false makes /metrics a 404 (an engine whose metrics cannot be read);
- `tokenize`: the status /tokenize answers from now on, with an empty body (500: the bare 500
  of an API server whose engine died); 200 answers it normally again;
- `exit`: the process ends with that status just after answering (os._exit: nothing in flight
  is finished, the child, if any, is left behind as a crashed vLLM leaves its EngineCore).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from engine.emulator.core import EngineCore

BUSY_TICK_S: Final = 0.05
EXIT_DELAY_S: Final = 0.05
"""Long enough for the answer to the exit request to go out first."""


@dataclass
class Controls:
    """What the control endpoint has changed; read by /health, /metrics and /tokenize."""

    health: int = 200
    metrics: bool = True
    tokenize: int = 200
    busy: bool = False
    child_pid: int | None = None
    """The child process the CLI started (`--child`), as vLLM starts its EngineCore."""


CONTROLS: Final = web.AppKey("emulator_controls", Controls)
_CORE: Final = web.AppKey("emulator_control_core", EngineCore)


class ControlRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    health: int | None = Field(None, ge=100, le=599)
    hang: bool | None = None
    busy: bool | None = None
    metrics: bool | None = None
    tokenize: int | None = Field(None, ge=200, le=599)
    exit: int | None = Field(None, ge=0, le=255)


def add_control(app: web.Application, core: EngineCore) -> None:
    """Serve the control routes on `app` and tick the busy counter while it runs."""
    app[_CORE] = core
    app.router.add_post("/_emulator/control", _control)
    app.router.add_get("/_emulator/info", _info)
    app.cleanup_ctx.append(_busy_ticker)


async def _control(request: web.Request) -> web.Response:
    try:
        changes = ControlRequest.model_validate(await request.json())
    except ValueError as exc:
        return web.json_response({"detail": str(exc)}, status=422)
    controls, core = request.app[CONTROLS], request.app[_CORE]
    if changes.health is not None:
        controls.health = changes.health
    if changes.metrics is not None:
        controls.metrics = changes.metrics
    if changes.tokenize is not None:
        controls.tokenize = changes.tokenize
    if changes.busy is not None:
        controls.busy = changes.busy
    if changes.hang is True:
        core.hang()
    elif changes.hang is False:
        core.flow()
    if changes.exit is not None:
        asyncio.get_running_loop().call_later(EXIT_DELAY_S, os._exit, changes.exit)
    return web.json_response({"ok": True})


async def _info(request: web.Request) -> web.Response:
    return web.json_response({"pid": os.getpid(), "child_pid": request.app[CONTROLS].child_pid})


async def _busy_ticker(app: web.Application) -> AsyncIterator[None]:
    async def tick() -> None:
        while True:
            await asyncio.sleep(BUSY_TICK_S)
            if app[CONTROLS].busy:
                app[_CORE].count_unsent_token()

    task = asyncio.create_task(tick())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
