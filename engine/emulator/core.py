"""The emulated engine core: a scheduler with a fixed number of slots, deterministic token
generation, vLLM's four load metrics, and the faults it can be told to have.

State changes only through `EngineCore` methods. Nothing here imports aiohttp.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import NoReturn

from prometheus_client import CollectorRegistry, Counter, Gauge

from engine.emulator.protocol import EngineDead
from engine.emulator.settings import EmulatorSettings
from engine.emulator.tokens import generated_token


class Fault(Enum):
    DIE = "die"
    HANG = "hang"


def marker_fault(texts: Iterable[str], *, die_on: str | None, hang_on: str | None) -> Fault | None:
    """Which fault a prompt's texts trigger; dying wins over hanging."""
    texts = list(texts)
    if die_on and any(die_on in t for t in texts):
        return Fault.DIE
    if hang_on and any(hang_on in t for t in texts):
        return Fault.HANG
    return None


@dataclass(frozen=True)
class Choice:
    """One sequence to generate: its index in the response, where its words start, and how
    many tokens it gets."""

    index: int
    start: int
    length: int
    offset: int = 0
    """Words of this answer the client already has (a continued assistant message): greedy
    decoding carries on from there, so a continuation reads as the rest of one answer."""


@dataclass(frozen=True)
class Token:
    index: int
    text: str
    last: bool


class EngineCore:
    def __init__(self, settings: EmulatorSettings, registry: CollectorRegistry) -> None:
        self._settings = settings
        self._slots = asyncio.Semaphore(settings.max_num_seqs)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._dead = False
        self.exit_requested = asyncio.Event()
        """Set when the engine died and `on_death` is "exit": the CLI then shuts down."""
        labels = {"model_name": settings.served_model_names[0], "engine": "0"}
        names = list(labels)
        self._running = Gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            names,
            registry=registry,
        ).labels(**labels)
        self._waiting = Gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            names,
            registry=registry,
        ).labels(**labels)
        self._prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", names, registry=registry
        ).labels(**labels)
        self._generation_tokens = Counter(
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            names,
            registry=registry,
        ).labels(**labels)

    @property
    def dead(self) -> bool:
        return self._dead

    def check_alive(self) -> None:
        if self._dead:
            raise EngineDead(EngineDead.message)

    def kill(self) -> NoReturn:
        """The engine loop dies (kserve#3971): this and every later generation fails."""
        self._dead = True
        if self._settings.on_death == "exit":
            self.exit_requested.set()
        raise EngineDead(EngineDead.message)

    def hang(self) -> None:
        """All generation stops for good; the HTTP server keeps answering."""
        self._flowing.clear()

    def flow(self) -> None:
        """Generation moves again after a hang."""
        self._flowing.set()

    def count_unsent_token(self) -> None:
        """A token generated for a request that has sent nothing yet: the counter moves."""
        self._generation_tokens.inc()

    def die(self) -> NoReturn:
        """The process ends at once, with everything in flight."""
        os._exit(self._settings.exit_code)

    def trigger(self, fault: Fault | None) -> None:
        if fault is Fault.DIE:
            self.die()
        if fault is Fault.HANG:
            self.hang()

    async def generate(
        self, choices: Sequence[Choice], prompt_tokens: int
    ) -> AsyncGenerator[list[Token]]:
        """Run one request: wait for a slot, then yield one step (a token per unfinished
        choice) at a time. Leaving early (client gone, cancelled) frees the slot."""
        self.check_alive()
        self._waiting.inc()
        try:
            await self._slots.acquire()
        finally:
            self._waiting.dec()
        self._running.inc()
        try:
            first_delay = self._settings.ttft_ms / 1000
            rate = self._settings.tokens_per_second
            delay = 1 / rate if rate > 0 else 0.0
            for k in range(max((c.length for c in choices), default=0)):
                await asyncio.sleep(first_delay if k == 0 else delay)
                await self._flowing.wait()
                self.check_alive()
                if k == 0:
                    # As vLLM: a prompt counts once its prefill is done, with its first token;
                    # a request stalled before that (a hang) moves no counter.
                    self._prompt_tokens.inc(prompt_tokens)
                step = [
                    Token(c.index, generated_token(c.start, c.offset + k), k == c.length - 1)
                    for c in choices
                    if k < c.length
                ]
                self._generation_tokens.inc(len(step))
                yield step
        finally:
            self._running.dec()
            self._slots.release()
