"""Typed app and request state: every key in one place."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from engine.supervisor import EngineSupervisor
from gateway.admission import Gate
from gateway.config import ConfigHolder
from gateway.engine_wire import EngineWire
from gateway.engineview import EngineHistory
from gateway.fleet import Fleet
from gateway.inflight import InflightLedger
from gateway.lifecycle import Lifecycle
from gateway.metrics import Metrics
from gateway.proxy import Upstream
from gateway.reload import Reloader
from gateway.requestlog import RequestRecord
from gateway.tokens import TokenCounters
from gateway.vocab import Vocabularies

CONFIG = web.AppKey("config", ConfigHolder)
SESSION = web.AppKey("upstream_session", aiohttp.ClientSession)
"""Probes and small JSON exchanges with the engine."""
WIRE = web.AppKey("engine_wire", EngineWire)
"""Generation and the relayed routes (gateway.engine_wire)."""
UPSTREAM = web.AppKey("upstream", Upstream)
SUPERVISOR = web.AppKey("supervisor", EngineSupervisor)
INFLIGHT = web.AppKey("inflight", InflightLedger)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
GATE = web.AppKey("gate", Gate)
FLEET = web.AppKey("fleet", Fleet)
"""Present only when `isolation.shared` is set."""
TOKENS = web.AppKey("tokens", TokenCounters)
VOCABULARIES = web.AppKey("vocabularies", Vocabularies)
ADMIN_APP = web.AppKey("admin_app", web.Application)
MAIN_APP = web.AppKey("main_app", web.Application)
ADMIN_TOKEN = web.AppKey("admin_token", str)
ENGINE_HISTORY = web.AppKey("engine_history", EngineHistory)
RELOADER = web.AppKey("reloader", Reloader)
CONFIG_PATH = web.AppKey("config_path", str)
API_KEYS = web.AppKey("api_keys", tuple[bytes, ...])
"""SHA-256 digests of the engine's API keys the gateway checks (gateway.edge); empty: none."""
METRICS = web.AppKey("metrics", Metrics)

RECORD = web.RequestKey("record", RequestRecord)
