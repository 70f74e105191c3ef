"""glibc's malloc arenas as `vllm-guard run` holds them (gateway.serve.limit_malloc_arenas):
threads that allocate at once share two arenas instead of one each; the operator's
MALLOC_ARENA_MAX stands."""

from __future__ import annotations

import os
import subprocess
import sys

from gateway.serve import MALLOC_ARENAS
from tests.helpers import ROOT

THREADS = 8

# Each thread allocates blocks that go to malloc (past pymalloc's 512 bytes, under the mmap
# threshold) and stays alive while glibc's malloc_stats prints one "Arena N:" per arena.
_SCRIPT = f"""
import ctypes, sys, threading
from gateway.serve import limit_malloc_arenas
if sys.argv[1] == "limit":
    assert limit_malloc_arenas()
allocated, done = threading.Barrier({THREADS + 1}), threading.Event()
kept = []
def work():
    kept.append([bytes(2048 + i) for i in range(64)])
    allocated.wait()
    done.wait()
threads = [threading.Thread(target=work) for _ in range({THREADS})]
for t in threads:
    t.start()
allocated.wait()
ctypes.CDLL(None).malloc_stats()
done.set()
for t in threads:
    t.join()
"""


def _arenas(mode: str, **env: str) -> int:
    """Arenas glibc made for a process with THREADS allocating threads alive at once."""
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | env
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return sum(line.startswith("Arena ") for line in done.stderr.splitlines())


def test_threads_that_allocate_share_the_arenas_the_gateway_allows() -> None:
    """With glibc's default every allocating thread gets an arena of its own; held by the
    gateway, all of them share MALLOC_ARENAS."""
    assert _arenas("default") > MALLOC_ARENAS
    assert 1 <= _arenas("limit") <= MALLOC_ARENAS


def test_the_operators_setting_stands() -> None:
    """MALLOC_ARENA_MAX in the environment is glibc's to apply: the gateway leaves it (and
    says so), whether lower or higher than its own."""
    code = "from gateway.serve import limit_malloc_arenas; print(limit_malloc_arenas())"
    for value in ("1", "16"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={**os.environ, "MALLOC_ARENA_MAX": value},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert out.strip() == "False"
    assert _arenas("default", MALLOC_ARENA_MAX="16") > MALLOC_ARENAS
