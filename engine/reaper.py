"""A tiny reaper between the gateway and the engine, so that the engine never outlives the gateway.

    python -m engine.reaper [--parent PID] [--grace SECONDS] -- ARGV...

It leads its own process group and starts ARGV in that group, then exits with ARGV's status (a
death by signal is passed on as the same signal). When its parent dies, even by SIGKILL, it stops
the whole group: SIGTERM, then SIGKILL after the grace. The kernel tells it at once
(PR_SET_PDEATHSIG); a check of the parent's pid every 0.2 s covers the moment before that is set
and systems without prctl.

A SIGTERM while the parent lives changes nothing: the supervisor signals the whole group and
escalates itself, and the engine must get one SIGTERM, not two.

Standard library only: the supervisor runs this file with its own interpreter in isolated mode
(`python -I`), whatever the engine's environment holds.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

PR_SET_PDEATHSIG = 1
PARENT_CHECK_S = 0.2
GROUP_POLL_S = 0.05
USAGE = "usage: python -m engine.reaper [--parent PID] [--grace SECONDS] -- ARGV..."


def set_parent_death_signal(sig: signal.Signals) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def group_members(pgid: int, *, exclude: int | None = None) -> list[int] | None:
    """Live (not zombie) processes of a process group, read from /proc; None where /proc is
    not there to read."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    members = []
    for name in names:
        if not name.isdigit() or int(name) == exclude:
            continue
        try:
            stat = Path("/proc", name, "stat").read_bytes()
        except OSError:
            continue  # gone between listing and reading
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat.rpartition(b")")[2].split()
        if len(fields) > 2 and fields[0] != b"Z" and int(fields[2]) == pgid:
            members.append(int(name))
    return members


def _parse(argv: Sequence[str]) -> tuple[int | None, float, list[str]]:
    parent: int | None = None
    grace = 10.0
    args = list(argv)
    while args and args[0] != "--":
        option = args.pop(0)
        if option not in {"--parent", "--grace"} or not args:
            raise ValueError(f"unexpected argument {option!r}")
        value = args.pop(0)
        if option == "--parent":
            parent = int(value)
        else:
            grace = float(value)
    if not args[1:]:
        raise ValueError("no command after --")
    return parent, grace, args[1:]


def _stop_group(child: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM to the group (this process ignores it), wait up to `grace` for the others to go,
    then SIGKILL to whatever is left, this process included."""
    pgid = os.getpgid(0)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        child.poll()
        members = group_members(pgid, exclude=os.getpid())
        if (members is None and child.returncode is not None) or members == []:
            return
        time.sleep(GROUP_POLL_S)
    os.killpg(pgid, signal.SIGKILL)


def _exit_like(returncode: int) -> int:
    """The exit status of this process for a child that ended with `returncode`."""
    if returncode >= 0:
        return returncode
    sig = -returncode
    with contextlib.suppress(OSError, ValueError):  # SIGKILL and SIGSTOP take no handler
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    return 128 + sig  # only reached for a signal whose default action is not to terminate


def main(argv: Sequence[str]) -> int:
    try:
        parent, grace, command = _parse(argv)
    except ValueError as exc:
        print(f"engine.reaper: {exc}\n{USAGE}", file=sys.stderr)
        return 2
    parent = os.getppid() if parent is None else parent
    if os.getpgid(0) != os.getpid():
        os.setsid()  # run by hand: lead a group of our own
    orphaned = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal orphaned
        orphaned = orphaned or os.getppid() != parent

    signal.signal(signal.SIGTERM, on_term)
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:
        return 1  # the parent died before the engine was started: start nothing
    try:
        child = subprocess.Popen(command)
    except OSError as exc:
        print(f"engine.reaper: cannot start {command[0]!r}: {exc}", file=sys.stderr)
        return 127
    while True:
        try:
            returncode = child.wait(timeout=PARENT_CHECK_S)
        except subprocess.TimeoutExpired:
            if orphaned or os.getppid() != parent:
                _stop_group(child, grace)
                return 1
            continue
        return _exit_like(returncode)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
