"""Child processes of the supervisor: start, watch, restart with backoff, reclaim what they held.

Each child runs `python -m daemon.child <role> <json-args>`; it dies with the supervisor
(PR_SET_PDEATHSIG). When one exits, its shared-memory segments are unlinked at once.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from daemon.metrics import mark_dead
from daemon.shm import reclaim

__all__ = ["Child", "spawn", "backoff_for"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Child:
    name: str                       # "engine-cpu", "http0", "zmq"
    role: str                       # engine | http | zmq
    args: dict[str, Any]
    proc: subprocess.Popen | None = None
    generation: int = 0
    restarts: int = 0
    failures: int = 0               # consecutive quick deaths, for backoff
    started_at: float = 0.0
    restart_at: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.running():
            try:
                self.proc.send_signal(sig)  # type: ignore[union-attr]
            except ProcessLookupError:
                pass


def spawn(child: Child, instance: str) -> None:
    cmd = [sys.executable, "-m", "daemon.child", child.role, json.dumps(child.args)]
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # A session of its own: a terminal's Ctrl-C or `timeout`'s group signal reaches only the
    # supervisor, which drains the children in order (systemd: KillMode=mixed).
    child.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    child.generation += 1
    child.started_at = time.monotonic()
    child.restart_at = None
    log.info("started %s (pid %d, generation %d)", child.name, child.proc.pid, child.generation)


def reap(child: Child, instance: str) -> int | None:
    """If the child has exited: reclaim its segments and return its exit code."""
    if child.proc is None:
        return None
    code = child.proc.poll()
    if code is None:
        return None
    removed = reclaim(instance, child.proc.pid)
    if removed:
        log.info("reclaimed %d shared-memory segment(s) of %s", len(removed), child.name)
    mark_dead(child.proc.pid)
    return code


def backoff_for(child: Child, schedule: tuple[float, ...]) -> float:
    """Delay before the next restart: grows with consecutive quick deaths, resets after 60 s."""
    if time.monotonic() - child.started_at > 60:
        child.failures = 0
    delay = schedule[min(child.failures, len(schedule) - 1)] if schedule else 1.0
    child.failures += 1
    return delay


def stop_all(children: list[Child], instance: str, timeout_s: float) -> None:
    """SIGTERM, wait up to `timeout_s`, then SIGKILL what is left; reclaim everything."""
    for c in children:
        c.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for c in children:
        if c.proc is None:
            continue
        try:
            c.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in time; killing it", c.name)
            c.proc.kill()
            c.proc.wait()
        reclaim(instance, c.proc.pid)
