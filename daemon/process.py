"""What every Ferry child process does first: its title, logging, dying with the parent, signals.

Children are started as `python -m daemon.child <role> <json-args>` by the supervisor; each role's
entry function calls `init_child()` and then runs its loop until `ProcessState.running` drops.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
from typing import Awaitable, Callable

from daemon.logs import setup_logging

__all__ = ["ProcessState", "init_child", "set_title", "die_with_parent", "rename_role",
           "run_until_signalled"]

_PR_SET_NAME = 15
_PR_SET_PDEATHSIG = 1


class ProcessState:
    """Signal handlers only set state here; loops read it."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.reload = threading.Event()
        self.signals: list[int] = []

    @property
    def running(self) -> bool:
        return not self.stop.is_set()


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None


def set_title(title: str) -> None:
    """Name the process for ps/top (the kernel's comm field, 15 characters)."""
    libc = _libc()
    if libc is not None:
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(title.encode()[:15]), 0, 0, 0)


def rename_role(old: str, new: str) -> bool:
    """Rewrite the argument `old` of this process's command line (/proc/<pid>/cmdline) to
    `new`, NUL-padded to the same length, in place: a standby engine that took over reads as
    an engine. False where the argument area cannot be written."""
    if len(new) > len(old):
        raise ValueError("the new role must not be longer than the old one")
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])      # arg_start, arg_end (proc(5))
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            args = mem.read(end - start)
            at = args.find(b"\0" + old.encode() + b"\0")
            if at < 0:
                return False
            mem.seek(start + at + 1)
            mem.write(new.encode().ljust(len(old), b"\0"))
        return True
    except (OSError, IndexError, ValueError):
        return False


def die_with_parent(parent_pid: int) -> None:
    """Get SIGKILL when the parent dies, so no child outlives a killed supervisor."""
    libc = _libc()
    if libc is not None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:   # the parent died before prctl took effect
        os._exit(1)


def init_child(role: str, *, parent_pid: int, log_level: str = "info",
               log_format: str = "json") -> ProcessState:
    set_title(f"ferry-{role}")
    die_with_parent(parent_pid)
    setup_logging(log_level, log_format, role=role)
    state = ProcessState()

    def on_term(signum: int, _frame: object) -> None:
        state.signals.append(signum)
        state.stop.set()

    def on_hup(_signum: int, _frame: object) -> None:
        state.reload.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_hup)
    logging.getLogger(__name__).debug("%s started (pid %d, python %s)", role, os.getpid(),
                                      sys.version.split()[0])
    return state


def run_until_signalled(serve: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run an asyncio role on uvloop until SIGTERM/SIGINT sets the event `serve` waits on."""
    import uvloop
    uvloop.install()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(stop)
    asyncio.run(main())
    return 0
