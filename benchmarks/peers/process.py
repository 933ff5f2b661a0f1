"""A peer server as a child process: started in its own process group, polled until its
readiness URL answers 200, stopped with SIGTERM (then SIGKILL) on the whole group."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PeerProcess", "PeerFailed"]

log = logging.getLogger(__name__)


class PeerFailed(RuntimeError):
    """A peer did not start (or died); the message holds the tail of its log."""


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return 0


@dataclass
class PeerProcess:
    name: str
    argv: list[str]
    ready_url: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180.0) -> PeerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        log.info("starting %s: %s", self.name, " ".join(self.argv))
        self.proc = subprocess.Popen(self.argv, env=env, cwd=self.cwd, start_new_session=True,
                                     stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while _status(self.ready_url) != 200:
            if self.proc.poll() is not None:
                raise PeerFailed(f"{self.name} exited with {self.proc.returncode}:\n"
                                 f"{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise PeerFailed(f"{self.name} not ready after {timeout_s:g} s:\n"
                                 f"{self.log_tail()}")
            time.sleep(0.25)
        return self

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise PeerFailed(f"{self.name} is not running")
        return self.proc.pid

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
