"""Live reload of config.yaml: noticed by itself, on SIGHUP, or on an admin request.

The file is watched by a cheap poll of its resolved path (`os.path.realpath` and its
mtime_ns, inode, device and size, twice a second). That sees both ways a file changes under a
running process: an editor writing a new file and renaming it over the old one, and a
Kubernetes ConfigMap volume swapping its `..data` symlink to a new timestamped folder
(config.yaml is a link through it, so its own mtime never changes: the resolved path does).
Inotify watchers see the symlink swap as events on other names; one stat per half second is
cheaper than being wrong about that.

A reload validates the new file completely (`gateway.snapshot`, in a worker thread) before
anything changes. Invalid: the running snapshot stays, the error is logged with key and line,
and `ReloadState.failures` counts it. Valid: what cannot change while the process runs is kept
at its running value (`pin_fixed`) and named in a log line, and the rest is applied in one
synchronous step ending with `ConfigHolder.swap`: requests that arrive after it see the new
snapshot, those in flight keep the one they read.

`ReloadState` is what a metric reads: the generation, the last reload's time and outcome,
the failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog

from gateway.config import Config, ConfigError, ConfigHolder
from gateway.snapshot import Snapshot

log = structlog.get_logger("gateway.reload")

POLL_INTERVAL_S = 0.5

FIXED_KEYS: tuple[str, ...] = (
    "server.host",
    "server.port",
    "server.max_body_bytes",
    "server.header_timeout_s",
    "server.keepalive_timeout_s",
    "server.api_key_env",
    "server.count_threads",
    "admin",
    "engine.url",
    "engine.connect_timeout_s",
    "isolation.shared",
    "metrics",
)
"""Read once when the gateway starts (its listeners and their connection timeouts, the
body-size cap of its app, the engine's API keys, the counters' threads, the routes of its
metrics, the session to the engine, the shared quarantine's Redis connection): a change waits
for the next gateway start."""

AT_ENGINE_RESTART: tuple[str, ...] = ("engine.command", "engine.env")
"""Applied to the snapshot, used when the engine is next (re)started."""


class Trigger(StrEnum):
    START = "start"
    FILE = "file"
    SIGNAL = "sighup"
    ADMIN = "admin"


class Outcome(StrEnum):
    APPLIED = "applied"
    INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class ReloadResult:
    outcome: Outcome
    trigger: Trigger
    at: float
    """Wall-clock seconds."""
    generation: int
    """The generation serving after this reload (unchanged when it was invalid)."""
    error: str | None = None
    changed: tuple[str, ...] = ()
    needs_gateway_restart: tuple[str, ...] = ()
    at_engine_restart: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    def public(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome.value,
            "trigger": self.trigger.value,
            "at": self.at,
            "generation": self.generation,
            "error": self.error,
            "changed": list(self.changed),
            "needs_gateway_restart": list(self.needs_gateway_restart),
            "at_engine_restart": list(self.at_engine_restart),
            "warnings": list(self.warnings),
        }


@dataclass(slots=True)
class ReloadState:
    """The reloads so far. Only `Reloader` changes it; metrics and the admin view read it."""

    path: str | None
    generation: int = 1
    """1 for the snapshot the gateway started with, one more per applied reload."""
    loaded_at: float = field(default_factory=time.time)
    """When the serving snapshot was applied (wall clock)."""
    applied: int = 0
    unchanged: int = 0
    """Of `applied`, the reloads whose file changed nothing."""
    failures: int = 0
    last: ReloadResult | None = None
    pending_gateway_restart: tuple[str, ...] = ()
    """Keys changed in the file that the running gateway keeps until it restarts."""
    pending_engine_restart: tuple[str, ...] = ()
    """Keys changed (engine.command, engine.env) that the running engine process predates."""
    warnings: tuple[str, ...] = ()
    """The serving snapshot's warnings."""


# -- pure: what changed, and what may change --------------------------------------------------


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two dumps (lists compared whole)."""
    out: list[str] = []
    for key in sorted(set(old) | set(new), key=str):
        name = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(changed_keys(a, b, name + "."))
        elif a != b:
            out.append(name)
    return out


def _under(key: str, roots: tuple[str, ...]) -> bool:
    return any(key == root or key.startswith(root + ".") for root in roots)


def pin_fixed(running: Config, new: Config) -> tuple[Config, tuple[str, ...], tuple[str, ...]]:
    """`new` with what cannot change live kept at its running value; the keys so kept (they
    wait for a gateway restart), and the keys that apply at the next engine restart."""
    changed = changed_keys(running.model_dump(mode="json"), new.model_dump(mode="json"))
    fixed = [k for k in changed if _under(k, FIXED_KEYS)]
    later = [k for k in changed if _under(k, AT_ENGINE_RESTART)]
    engine_keep: dict[str, Any] = {
        "url": running.engine.url,
        "connect_timeout_s": running.engine.connect_timeout_s,
    }
    if (running.engine.command is None) != (new.engine.command is None):
        # Supervised or sidecar is the gateway's shape, decided at start.
        engine_keep.update(command=running.engine.command, env=running.engine.env)
        fixed.append("engine.command (supervised or sidecar)")
        later = [k for k in later if not _under(k, AT_ENGINE_RESTART)]
    server = new.server.model_copy(
        update={
            "host": running.server.host,
            "port": running.server.port,
            "max_body_bytes": running.server.max_body_bytes,
            "header_timeout_s": running.server.header_timeout_s,
            "keepalive_timeout_s": running.server.keepalive_timeout_s,
            "api_key_env": running.server.api_key_env,
            "count_threads": running.server.count_threads,
        }
    )
    pinned = new.model_copy(
        update={
            "server": server,
            "admin": running.admin,
            "metrics": running.metrics,
            "engine": new.engine.model_copy(update=engine_keep),
            "isolation": new.isolation.model_copy(update={"shared": running.isolation.shared}),
        }
    )
    return pinned, tuple(_collapse(fixed)), tuple(_collapse(later))


def _collapse(keys: list[str]) -> list[str]:
    """engine.env.A, engine.env.B → engine.env (names of env vars are not the point)."""
    return list(dict.fromkeys("engine.env" if k.startswith("engine.env.") else k for k in keys))


def file_stamp(path: Path) -> tuple[str, int, int, int, int] | None:
    """What changes when the file at `path` does, through any symlinks; None if unreadable."""
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return None
    return (real, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_size)


# -- the reloader -----------------------------------------------------------------------------

Prepare = Callable[[Path], Snapshot]
"""Blocking: read and validate a file completely (run in a worker thread)."""
Apply = Callable[[Config, Config, Snapshot], None]
"""Synchronous: (running, new, snapshot) → the new snapshot serves; ends with the swap."""


class Reloader:
    def __init__(
        self,
        path: Path,
        holder: ConfigHolder,
        prepare: Prepare,
        apply: Apply,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.holder = holder
        self.state = ReloadState(str(path))
        self._prepare = prepare
        self._apply = apply
        self._wall_clock = wall_clock
        self._lock = asyncio.Lock()

    async def reload(self, trigger: Trigger) -> ReloadResult:
        """Validate the file and apply it, or keep the running snapshot. One at a time."""
        async with self._lock:
            state = self.state
            try:
                snapshot = await asyncio.to_thread(self._prepare, self.path)
            except ConfigError as err:
                state.failures += 1
                result = ReloadResult(
                    Outcome.INVALID, trigger, self._wall_clock(), state.generation, str(err)
                )
                state.last = result
                log.error(  # noqa: TRY400 - the message names key and line; no traceback
                    "config_reload_failed",
                    trigger=trigger.value,
                    path=str(self.path),
                    error=str(err),
                    generation=state.generation,
                    failures=state.failures,
                )
                return result
            running = self.holder.current
            pinned, fixed, later = pin_fixed(running, snapshot.config)
            changed = changed_keys(running.model_dump(mode="json"), pinned.model_dump(mode="json"))
            self._apply(running, pinned, snapshot)
            state.generation += 1
            state.applied += 1
            if not changed:
                state.unchanged += 1
            state.loaded_at = self._wall_clock()
            state.pending_gateway_restart = fixed
            if later:
                state.pending_engine_restart = tuple(
                    dict.fromkeys((*state.pending_engine_restart, *later))
                )
            state.warnings = snapshot.warnings
            result = ReloadResult(
                Outcome.APPLIED,
                trigger,
                state.loaded_at,
                state.generation,
                changed=tuple(_collapse(changed)),
                needs_gateway_restart=fixed,
                at_engine_restart=later,
                warnings=snapshot.warnings,
            )
            state.last = result
        log.info(
            "config_reloaded",
            trigger=trigger.value,
            generation=result.generation,
            changed=list(result.changed),
        )
        if fixed:
            log.warning("config_change_needs_gateway_restart", keys=list(fixed))
        if later:
            log.warning(
                "config_change_at_next_engine_restart",
                keys=list(later),
                hint="restart the engine from the admin listener: POST /engine/restart",
            )
        for warning in snapshot.warnings:
            log.warning("config_warning", warning=warning)
        return result

    async def watch(self, interval_s: float = POLL_INTERVAL_S) -> None:
        """Reload whenever the file's stamp changes; forever (cancel to stop)."""
        stamp = file_stamp(self.path)
        while True:
            await asyncio.sleep(interval_s)
            now = file_stamp(self.path)
            if now == stamp:
                continue
            stamp = now
            if now is None:
                log.warning("config_file_unreadable", path=str(self.path))
                continue
            await self._reload_logged(Trigger.FILE)

    async def _reload_logged(self, trigger: Trigger) -> None:
        try:
            await self.reload(trigger)
        except Exception:  # a bug in applying must not stop the watch or leak from a signal
            log.exception("config_reload_error", path=str(self.path), trigger=trigger.value)

    @contextlib.asynccontextmanager
    async def running(self, *, sighup: bool = True) -> AsyncIterator[Reloader]:
        """Watch the file (and SIGHUP, when this is the main thread) while inside."""
        loop = asyncio.get_running_loop()
        watcher = asyncio.create_task(self.watch(), name="config-watch")
        pending: set[asyncio.Task[None]] = set()

        def on_sighup() -> None:
            log.info("config_reload_signal", signal="SIGHUP")
            task = asyncio.create_task(self._reload_logged(Trigger.SIGNAL))
            pending.add(task)
            task.add_done_callback(pending.discard)

        handled = False
        if sighup:
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                loop.add_signal_handler(signal.SIGHUP, on_sighup)
                handled = True
        try:
            yield self
        finally:
            if handled:
                loop.remove_signal_handler(signal.SIGHUP)
            watcher.cancel()
            for task in (watcher, *pending):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
