"""The operator's listener: quarantine list and clear. Bound to loopback by default and never
served on the client port."""

from __future__ import annotations

from aiohttp import web

from gateway.keys import GATE, MAIN_APP


async def list_quarantine(request: web.Request) -> web.Response:
    """Fingerprint, model, since, until, reason: never the prompt text."""
    gate = request.app[MAIN_APP][GATE]
    entries = [e.public() for e in gate.quarantine.entries(gate.wall_clock())]
    return web.json_response({"quarantine": entries, "suspects": len(gate.suspects)})


async def clear_quarantine(request: web.Request) -> web.Response:
    gate = request.app[MAIN_APP][GATE]
    return web.json_response({"cleared": gate.quarantine.clear()})


async def remove_entry(request: web.Request) -> web.Response:
    gate = request.app[MAIN_APP][GATE]
    if gate.quarantine.remove(request.match_info["fingerprint"]):
        return web.json_response({"cleared": 1})
    return web.json_response({"cleared": 0}, status=404)


def create_admin_app(main: web.Application) -> web.Application:
    admin = web.Application()
    admin[MAIN_APP] = main
    admin.router.add_get("/quarantine", list_quarantine)
    admin.router.add_delete("/quarantine", clear_quarantine)
    admin.router.add_delete("/quarantine/{fingerprint}", remove_entry)
    return admin
