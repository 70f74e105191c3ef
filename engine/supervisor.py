"""Engine supervision: one detection and one set of states for both deployment shapes.

- Supervised (`engine.command` set): the supervisor starts the engine (`engine.process`), watches
  it, and on failure stops its process group and starts it again with exponential backoff, until
  too many restarts within a window make it give up.
- Sidecar (no command): the engine runs in its own container. The supervisor cannot restart it;
  it reports it not live (`live()`, served as `/engine/live` for the engine container's
  livenessProbe) so that the kubelet restarts it, and keeps probing until it is ready again.

States: starting → ready → failed → restarting → (starting →) ready, or given_up; stopped before
start and after stop. Ready means a real one-token generation succeeded. While ready, the engine
fails when its process exits (any status, 0 included), when `/health` fails `health_failures`
probes in a row, or when it is wedged: in-flight requests receive no bytes and its token counters
stand still for `wedge_timeout_s`, and a probe generation does not answer either. A busy engine is
not a wedged one: a false verdict kills every request in flight, so the detection errs on the
side of patience.

Decisions are the pure functions of `engine.detect`; `EngineSupervisor` does the I/O and changes
the state, which its base `engine.state.StateKeeper` holds and tells subscribers of.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, Protocol

import aiohttp
import structlog

from engine.detect import (
    backoff_delay,
    decide_wedge,
    parse_counters,
    restart_evidence,
    retry_after,
    should_give_up,
)
from engine.facts import EngineFacts
from engine.probes import Prober
from engine.process import EngineProcess
from engine.settings import EngineConfig
from engine.state import EngineState, StateKeeper

logger = structlog.get_logger(__name__)


class ProgressSource(Protocol):
    """What the gateway knows of the requests it relays to the engine."""

    def stalled_for(self, now: float) -> float | None:
        """Seconds since any in-flight generation request last received a byte from the engine
        (monotonic clock), or None when nothing is in flight."""


class EngineSupervisor(StateKeeper):
    """Watches the engine, restarts it when supervised, and tells the gateway what state it is
    in. Methods are called on the event loop's thread."""

    def __init__(
        self,
        config: EngineConfig,
        session: aiohttp.ClientSession,
        *,
        progress: ProgressSource | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._config = config
        self._session = session
        self._progress = progress
        self._clock = clock
        self._prober = Prober(config, session)
        self._facts = EngineFacts()
        self._task: asyncio.Task[None] | None = None
        self._process: EngineProcess | None = None
        self._spawning: asyncio.Future[EngineProcess] | None = None
        self._restart_times: list[float] = []
        self._start_s: float | None = None  # how long the last successful (re)start took
        self._expected_ready_at: float | None = None
        self._check_now = asyncio.Event()  # a failure report asks for a probe now
        self._restart_event = asyncio.Event()
        self._restart_reason = ""
        self._tokens: float | None = None  # token counters as last read, while watching
        self._tokens_moved_at = 0.0
        self._cleared_at: float | None = None
        # Sidecar shape: what /metrics said of the engine process, and whether a connection
        # was refused since (restart_evidence).
        self._marks: Mapping[str, float] | None = None
        self._refused = False
        self._restarted_event = asyncio.Event()
        self._restarted_reason = ""

    # What the gateway reads.

    @property
    def facts(self) -> EngineFacts:
        """What the engine said of itself (models, roots, max_model_len), read again each time
        it became ready: the one place the gateway learns them."""
        return self._facts

    @property
    def models(self) -> Mapping[str, int]:
        """Served model ids (LoRA adapters included) to max_model_len, as of the last READY."""
        return self._facts.lengths

    @property
    def model_families(self) -> Mapping[str, str]:
        """Served model ids to the model they serve (`EngineFacts.families`), as of the last
        /v1/models read when the engine became ready."""
        return self._facts.families

    @property
    def supervised(self) -> bool:
        return self._config.command is not None

    @property
    def pid(self) -> int | None:
        """The engine's process group id (its leader is the reaper) while a supervised engine
        process runs; None in the sidecar shape and between runs."""
        return None if self._process is None else self._process.pid

    def retry_after_s(self) -> float:
        """Seconds until the engine is expected ready: the last successful start's duration (or
        `expected_restart_s` before one is measured) from when this (re)start began, at least 1."""
        if not self.restart_expected():
            return max(1.0, self._config.expected_restart_s)
        if self.is_ready():
            return 1.0
        return retry_after(self._expected_ready_at, self._clock(), self._config.expected_restart_s)

    # What the gateway asks.

    async def start(self) -> None:
        """Start watching (and the engine, when supervised); returns at once."""
        if self._task is not None:
            return
        self._transition(EngineState.STARTING, "start")
        self._task = asyncio.create_task(self._run(), name="engine-supervisor")

    async def stop(self) -> None:
        """Stop watching, and stop the engine's process group when supervised."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        spawning, self._spawning = self._spawning, None
        if spawning is not None and self._process is None:
            with contextlib.suppress(OSError):
                self._process = await spawning
        await self._stop_process()
        if self._state is not EngineState.STOPPED:
            self._transition(EngineState.STOPPED, "stop")

    def report_engine_failure(self, reason: str) -> None:
        """The gateway saw the engine fail a request (refused, reset): probe /health now, and
        again at the startup interval while it fails. Only the probes decide: `health_failures`
        in a row fail the engine; one report alone fails nothing."""
        if self.is_ready():
            logger.info("engine_failure_reported", reason=reason)
            self._check_now.set()

    async def restart(self, reason: str) -> None:
        """Restart a supervised engine now; returns once the restart has begun. The sidecar
        shape cannot restart its engine: the request is logged and ignored."""
        if not self.supervised:
            logger.warning("engine_restart_unavailable", reason=reason, shape="sidecar")
            return
        if self._task is None or self._state not in {EngineState.READY, EngineState.STARTING}:
            logger.info("engine_restart_ignored", reason=reason, state=self._state.value)
            return
        self._restart_reason = reason
        self._restart_event.set()
        await self._wait_until(
            lambda: self._state not in {EngineState.READY, EngineState.STARTING}, 30.0
        )

    def reconfigure(self, config: EngineConfig) -> None:
        """Settings from a reloaded config: probes, wedge detection and the restart policy
        apply from now on, the command and environment at the next (re)start. The URL stays
        the one this supervisor was made with."""
        self._config = config.model_copy(update={"url": self._config.url})

    async def settle(self, suspicion: str) -> bool:
        """Run a probe generation now: True if the ready engine answers it and is the process
        it was. A sidecar engine that answers but restarted under the gateway (see
        `_restart_check`) is failed, and the answer is False."""
        if not self.is_ready():
            return False
        if not self.supervised and (await self._prober.health()).status == 200:
            evidence = await self._restart_check()
            if evidence is not None and self.is_ready():
                self._restarted_reason = evidence
                self._restarted_event.set()
                logger.info("engine_settle", suspicion=suspicion, answered=False, detail=evidence)
                return False
        ok, detail = await self._prober.generation(self._facts.default_model or "")
        logger.info("engine_settle", suspicion=suspicion, answered=ok, detail=detail)
        return ok

    # The cycle.

    async def _run(self) -> None:
        try:
            await self._cycle()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not leave the gateway thinking all is well
            logger.exception("engine_supervisor_error")
            self._transition(EngineState.GIVEN_UP, f"supervisor error: {exc!r}")

    async def _cycle(self) -> None:
        first = True
        while True:
            reason = await self._start_and_watch(first)
            first = False
            self._restart_event.clear()  # this failure answers any restart asked meanwhile
            self._expected_ready_at = self._clock() + self._expected_start_s()
            self._transition(EngineState.FAILED, reason)
            if self._config.command is None:
                self._transition(
                    EngineState.RESTARTING, "waiting for the engine container to be restarted"
                )
                continue
            await self._stop_process()
            now = self._clock()
            cfg = self._config
            if should_give_up(self._restart_times, now, cfg.max_restarts, cfg.restart_window_s):
                self._expected_ready_at = None
                self._transition(
                    EngineState.GIVEN_UP,
                    f"{cfg.max_restarts} restarts within {cfg.restart_window_s:g}s;"
                    f" last failure: {reason}",
                )
                return
            self._restart_times = [
                t for t in self._restart_times if now - t < cfg.restart_window_s
            ] + [now]
            attempt = len(self._restart_times)
            delay = backoff_delay(attempt, cfg.restart_backoff_s, cfg.restart_backoff_max_s)
            self._expected_ready_at = now + delay + self._expected_start_s()
            self._transition(
                EngineState.RESTARTING, f"restart {attempt} of {cfg.max_restarts} in {delay:g}s"
            )
            await asyncio.sleep(delay)

    async def _start_and_watch(self, first: bool) -> str:
        """(Start and) probe the engine until ready, then watch it; why it failed."""
        began = self._clock()
        self._prober.new_start()
        timeout = self._config.startup_timeout_s if self.supervised or first else None
        if self._config.command is not None:
            # Shielded: a stop() arriving meanwhile must still find the process to stop it.
            self._spawning = asyncio.ensure_future(
                EngineProcess.spawn(
                    self._config.command, env=self._config.env, grace_s=self._config.stop_grace_s
                )
            )
            try:
                self._process = await asyncio.shield(self._spawning)
            except OSError as exc:
                return f"cannot start the engine: {exc}"
            finally:
                if self._spawning.done():
                    self._spawning = None
            began = self._clock()
            self._expected_ready_at = began + self._expected_start_s()
            if not first:
                self._transition(EngineState.STARTING, f"spawned pid {self._process.pid}")
        reason, probes = await self._until_ready(timeout)
        if reason is not None:
            return reason
        if self.supervised or probes > 1:  # a sidecar engine up at the first probe: no measure
            self._start_s = self._clock() - began
        self._epoch += 1
        self._tokens = None
        self._cleared_at = None
        self._refused = False
        self._marks = None if self.supervised else await self._prober.marks()
        self._restarted_event.clear()
        self._transition(
            EngineState.READY,
            f"probe generation answered on {self._prober.kind}; models {sorted(self.models)}",
        )
        return await self._watch()

    def _expected_start_s(self) -> float:
        return self._config.expected_restart_s if self._start_s is None else self._start_s

    async def _stop_process(self) -> None:
        process = self._process
        if process is not None:
            await process.stop(self._config.stop_grace_s)  # again from stop() if cancelled
            if self._process is process:
                self._process = None

    async def _until_ready(self, timeout: float | None) -> tuple[str | None, int]:
        """Probe until the engine is ready (None) or a failure reason; and the probes made."""
        probes = 0
        last = "no probe yet"

        async def probe_loop() -> str | None:
            nonlocal probes, last
            if self.supervised:
                await asyncio.sleep(self._config.startup_probe_interval_s)
            while True:
                probes += 1
                facts, detail = await self._prober.ready()
                if facts is not None:
                    self._facts = facts
                    return None
                if detail != last:  # each new reason once, not each probe
                    self._why_not_ready = detail
                    self._note(detail)
                last = detail
                await asyncio.sleep(self._config.startup_probe_interval_s)

        async def startup_timeout(seconds: float) -> str:
            await asyncio.sleep(seconds)
            return f"not ready within {seconds:g}s (last probe: {last})"

        watchers = [probe_loop(), self._restart_requested()]
        if self._process is not None:
            watchers.append(self._exited(self._process, "while starting"))
        if timeout is not None:
            watchers.append(startup_timeout(timeout))
        return await _first(watchers), probes

    async def _watch(self) -> str:
        """Watch the ready engine until it fails; the reason."""
        watchers = [self._health_loop(), self._restart_requested(), self._restarted_under_us()]
        if self._process is not None:
            watchers.append(self._exited(self._process, "while ready"))
        if self._progress is not None:
            watchers.append(self._wedge_loop(self._progress))
        reason = await _first(watchers)
        assert reason is not None
        return reason

    async def _exited(self, process: EngineProcess, when: str) -> str:
        status = await process.wait()
        if status < 0:
            with contextlib.suppress(ValueError):
                return f"engine exited with status {status} ({signal.Signals(-status).name}) {when}"
        return f"engine exited with status {status} {when}"

    async def _restart_requested(self) -> str:
        await self._restart_event.wait()
        self._restart_event.clear()
        return f"restart requested: {self._restart_reason}"

    async def _restarted_under_us(self) -> str:
        await self._restarted_event.wait()
        self._restarted_event.clear()
        return f"the engine restarted without the gateway seeing it ({self._restarted_reason})"

    async def _restart_check(self) -> str | None:
        """Sidecar shape, once /health answered 200: evidence that it is not the process it was
        (`detect.restart_evidence`: its start time, a counter gone backwards, or a refused
        connection before this answer). Without evidence the reading becomes the baseline."""
        marks = await self._prober.marks()
        evidence = restart_evidence(self._marks, marks, self._refused)
        if evidence is None:
            if marks is not None:
                self._marks = marks
            self._refused = False
        return evidence

    async def _health_loop(self) -> str:
        cfg = self._config
        self._check_now.clear()
        failures = 0
        while True:
            interval = (
                cfg.probe_interval_s
                if failures == 0
                else min(cfg.probe_interval_s, cfg.startup_probe_interval_s)
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._check_now.wait(), interval)
            self._check_now.clear()
            answer = await self._prober.health()
            if answer.status == 200:
                if not self.supervised:
                    evidence = await self._restart_check()
                    if evidence is not None:
                        return f"the engine restarted without the gateway seeing it ({evidence})"
                failures = 0
                continue
            self._refused = self._refused or answer.refused
            detail = answer.text
            failures += 1
            logger.warning(
                "engine_probe_failed",
                probe="health",
                detail=detail,
                failures=failures,
                of=cfg.health_failures,
            )
            if failures >= cfg.health_failures:
                return f"/health failed {failures} probes in a row (last: {detail})"

    async def _wedge_loop(self, progress: ProgressSource) -> str:
        timeout = self._config.wedge_timeout_s
        while True:
            await asyncio.sleep(self._config.wedge_check_interval_s)
            stalled, quiet = await self._progress_now(progress)
            since_cleared = None if self._cleared_at is None else self._clock() - self._cleared_at
            if not decide_wedge(stalled, quiet, since_cleared, timeout):
                continue
            logger.warning("engine_wedge_suspected", stalled_for=stalled, tokens_quiet_for=quiet)
            ok, detail = await self._prober.generation(self._facts.default_model or "")
            if not ok:
                # Patience: a last look at whether anything moved while the probe waited.
                stalled, quiet = await self._progress_now(progress)
                ok = not decide_wedge(stalled, quiet, None, timeout)
            if ok:
                self._cleared_at = self._clock()
                logger.info("engine_wedge_cleared", stalled_for=stalled, detail=detail)
                continue
            quiet_text = "unknown (no /metrics)" if quiet is None else f"{quiet:.0f}s"
            return (
                f"wedged: no bytes to in-flight requests for {stalled:.0f}s, token counters "
                f"still for {quiet_text}, probe generation failed ({detail})"
            )

    async def _progress_now(self, progress: ProgressSource) -> tuple[float | None, float | None]:
        """The stall of in-flight requests, and how long the token counters have stood still
        (None if /metrics has not been readable during this stall). Counters are read only while
        in-flight requests stall; their watch begins with the stall."""
        stalled = progress.stalled_for(self._clock())
        if stalled is None or stalled < self._config.wedge_check_interval_s:
            self._tokens = None  # bytes flow: the counters' watch begins with the next stall
            if stalled is None:
                self._cleared_at = None
            return stalled, None
        answer = await self._prober.request("GET", "/metrics")
        tokens = parse_counters(answer.text) if answer.status == 200 else None
        now = self._clock()
        if tokens is not None and tokens != self._tokens:
            self._tokens, self._tokens_moved_at = tokens, now
        if self._tokens is None:
            return stalled, None
        return stalled, now - self._tokens_moved_at


async def _first(watchers: Sequence[Coroutine[Any, Any, str | None]]) -> str | None:
    """Run the watchers until one returns; cancel the others; its result."""
    tasks = [asyncio.create_task(watcher) for watcher in watchers]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        return next(task for task in tasks if task in done).result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
