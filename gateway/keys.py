"""Typed app and request state: every key in one place."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from engine.supervisor import EngineSupervisor
from gateway.admission import Gate
from gateway.config import ConfigHolder
from gateway.fleet import Fleet
from gateway.inflight import InflightLedger
from gateway.lifecycle import Lifecycle
from gateway.proxy import Upstream
from gateway.requestlog import RequestRecord
from gateway.tokens import TokenCounters

CONFIG = web.AppKey("config", ConfigHolder)
SESSION = web.AppKey("upstream_session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", Upstream)
SUPERVISOR = web.AppKey("supervisor", EngineSupervisor)
INFLIGHT = web.AppKey("inflight", InflightLedger)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
GATE = web.AppKey("gate", Gate)
FLEET = web.AppKey("fleet", Fleet)
"""Present only when `isolation.shared` is set."""
TOKENS = web.AppKey("tokens", TokenCounters)
ADMIN_APP = web.AppKey("admin_app", web.Application)
MAIN_APP = web.AppKey("main_app", web.Application)

RECORD = web.RequestKey("record", RequestRecord)
