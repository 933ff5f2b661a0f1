"""Child processes of the supervisor: start, watch, restart with backoff, reclaim what they held.

A child that had been serving for `STABLE_S` when it died (a kill -9, the OOM killer, a crash
on one request) restarts after the schedule's first delay, 0 by default: waiting would only
lengthen the outage. One that dies while starting, or soon after it came up, is crash-looping:
each such death takes the schedule one step further.

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

import psutil

from daemon.metrics import mark_dead
from daemon.shm import reclaim

__all__ = ["Child", "spawn", "spawn_standby", "take_over", "backoff_for", "STABLE_S"]

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
    healthy_at: float | None = None  # when it last finished starting (None: not yet)
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


# OpenMP threads that wait for work spin for a bounded time, then sleep: libgomp's default spin
# (300k iterations) lets idle threads take the CPU from the one doing the work when another
# process competes for the cores, and a two-thread decode step then takes 10x as long
# (benchmarks/bench_busy_host.py). An operator's own OMP_WAIT_POLICY / GOMP_SPINCOUNT wins.
OMP_SPINCOUNT = "1000"


def default_threads() -> int:
    """Compute threads of an engine when `[engines] threads` is 0: the CPUs this process may
    run on less one, left to the frontends and the rest of the host (vLLM's CPU backend reserves
    one the same way), and at most the physical cores. A step split over N threads runs at the
    pace of its slowest: with every core used, one competing process doubled a two-thread
    decode step, while one thread on two cores kept its pace (benchmarks/bench_busy_host.py)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:          # not Linux
        cpus = os.cpu_count() or 1
    # SMT siblings share a core's units: no more threads than physical cores (torch's own rule)
    cores = psutil.cpu_count(logical=False) or cpus
    return max(1, min(cpus - 1, cores))


def compute_env(base: dict[str, str], threads: int | None = None) -> dict[str, str]:
    """The environment of a child process: `base` plus Ferry's defaults. `threads`: an engine's
    (or its standby's) `[engines] threads`, 0 for `default_threads()`; torch reads
    OMP_NUM_THREADS once, at import. An operator's own OMP_NUM_THREADS wins."""
    env = dict(base)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        env["GOMP_SPINCOUNT"] = OMP_SPINCOUNT
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads or default_threads()))
    return env


def _threads_of(args: dict[str, Any]) -> int:
    return int(args.get("threads") or 0)


def spawn(child: Child, instance: str) -> None:
    cmd = [sys.executable, "-m", "daemon.child", child.role, json.dumps(child.args)]
    env = compute_env(dict(os.environ),
                      _threads_of(child.args) if child.role == "engine" else None)
    # A session of its own: a terminal's Ctrl-C or `timeout`'s group signal reaches only the
    # supervisor, which drains the children in order (systemd: KillMode=mixed).
    child.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    child.generation += 1
    child.started_at = time.monotonic()
    child.restart_at = None
    child.healthy_at = None
    log.info("started %s (pid %d, generation %d)", child.name, child.proc.pid, child.generation)


def spawn_standby(standby: Child) -> None:
    """Start `standby` (role "standby"): it imports and waits on its stdin (engines/standby.py)."""
    cmd = [sys.executable, "-m", "daemon.child", "standby", json.dumps(standby.args)]
    standby.proc = subprocess.Popen(cmd, env=compute_env(dict(os.environ),
                                                         _threads_of(standby.args)),
                                    stdin=subprocess.PIPE, start_new_session=True)
    standby.started_at = time.monotonic()
    log.info("started a standby for %s (pid %d)", standby.name, standby.proc.pid)


def take_over(child: Child, standby: Child) -> bool:
    """Make the waiting `standby` process `child`'s next generation; False if it is gone."""
    proc = standby.proc
    if proc is None or proc.poll() is not None or proc.stdin is None:
        return False
    try:
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
    except OSError:     # it died between the poll and the write
        return False
    child.proc, standby.proc = proc, None
    child.generation += 1
    child.started_at = time.monotonic()
    child.restart_at = None
    child.healthy_at = None
    log.info("standby pid %d takes over %s (generation %d)", proc.pid, child.name,
             child.generation)
    return True


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


# How long a child must have been up (started and serving) for its death to restart it at once.
STABLE_S = 5.0


def backoff_for(child: Child, schedule: tuple[float, ...]) -> float:
    """Delay before restarting `child`, which just died: the schedule's first step if it had
    been serving for STABLE_S, else the next one (consecutive quick deaths climb it)."""
    if child.healthy_at is not None and time.monotonic() - child.healthy_at >= STABLE_S:
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
