"""The supervisor's HTTP exchanges with the engine: /health, /v1/models (the engine's facts),
the one-token probe generation on a path the engine serves, and /metrics.

Each exchange is bounded by `probe_timeout_s` and answers a value, never raises for what the
engine did. The generation path is discovered once per start (`engine.probe: auto`); what the
probes decide is `engine.detect`'s.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from engine.detect import FALL_THROUGH, ProbeKind, parse_marks, probe_kinds, probe_request
from engine.facts import EngineFacts, parse_facts
from engine.settings import EngineConfig


@dataclass(frozen=True, slots=True)
class Answer:
    status: int | None
    """None when the engine gave no answer."""
    text: str
    """The body when 200, else what went wrong ("HTTP 503", "ClientConnectorError: ...")."""
    refused: bool = False
    """No connection could be made (nothing listening, or the host unreachable)."""


class Prober:
    """Probes one engine. `new_start()` forgets the discovered probe path."""

    def __init__(self, config: EngineConfig, session: aiohttp.ClientSession) -> None:
        self._config = config
        self._session = session
        self._base_url = config.url.rstrip("/")
        self._kind: ProbeKind | None = None

    @property
    def kind(self) -> ProbeKind | None:
        """The probe generation's path as discovered during this start (None: not yet)."""
        return self._kind if self._config.probe == "auto" else self._config.probe

    def new_start(self) -> None:
        self._kind = None

    async def health(self) -> Answer:
        return await self.request("GET", "/health")

    async def ready(self) -> tuple[EngineFacts | None, str]:
        """/health, /v1/models, then a one-token generation: the engine's facts when all
        answered, else None and what failed."""
        answer = await self.health()
        if answer.status != 200:
            return None, f"/health: {answer.text}"
        answer = await self.request("GET", "/v1/models")
        if answer.status != 200:
            return None, f"/v1/models: {answer.text}"
        try:
            facts = parse_facts(json.loads(answer.text))
        except ValueError:
            return None, "/v1/models: not JSON"
        if facts.default_model is None:
            return None, "/v1/models: no models"
        ok, detail = await self.generation(facts.default_model)
        return (facts, detail) if ok else (None, detail)

    async def generation(self, model: str) -> tuple[bool, str]:
        """A one-token generation: whether it answered, and on which path or why not
        ("probe generation: 404 on /v1/completions"). With `auto`, a completions path the
        engine does not serve (404, 405) is followed by chat in the same probe."""
        failures: list[str] = []
        kinds = probe_kinds(self._config.probe, self._kind)
        for kind in kinds:
            path, payload = probe_request(kind, model)
            answer = await self.request("POST", path, payload)
            if answer.status == 200:
                if self._config.probe == "auto":
                    self._kind = kind
                return True, f"probe generation answered on {path}"
            failures.append(f"{answer.status or answer.text} on {path}")
            if answer.status not in FALL_THROUGH:
                break
        return False, "probe generation: " + ", ".join(failures)

    async def marks(self) -> dict[str, float] | None:
        """`detect.parse_marks` of /metrics, or None when it is not readable."""
        answer = await self.request("GET", "/metrics")
        return parse_marks(answer.text) if answer.status == 200 else None

    async def request(
        self, method: str, path: str, payload: Mapping[str, Any] | None = None
    ) -> Answer:
        """One probe, bounded by `probe_timeout_s`."""
        timeout = aiohttp.ClientTimeout(total=self._config.probe_timeout_s)
        try:
            async with self._session.request(
                method, self._base_url + path, json=payload, timeout=timeout
            ) as resp:
                body = await resp.text(errors="replace")
                return Answer(resp.status, body if resp.status == 200 else f"HTTP {resp.status}")
        except TimeoutError:
            return Answer(None, f"no answer within {self._config.probe_timeout_s:g}s")
        except aiohttp.ClientConnectorError as exc:
            return Answer(None, f"{type(exc).__name__}: {exc}", refused=True)
        except aiohttp.ClientError as exc:
            return Answer(None, f"{type(exc).__name__}: {exc}")
