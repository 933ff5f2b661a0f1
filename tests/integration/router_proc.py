"""A real LLM router of the field (vllm-router, from PyPI) in front of N Ferry daemons.

`router_binary()` returns the `vllm-router` entry point of a private virtual environment
(`.venv-router` at the repository root, or `$FERRY_ROUTER_VENV`), creating it with
`python -m venv` and installing the pinned version with pip when it is missing; it returns None
with the reason when pip cannot install it (no registry), so tests can skip saying why.

`Router(workers, policy=...)` runs it as users do (its own process, real sockets) with health
checks, retries and circuit breakers tightened to the seconds a test can wait, and
`fleet(repo, n)` starts the daemons. Shared by tests/integration/test_router.py and
benchmarks/bench_router.py.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.daemon_proc import REPO, Daemon, free_port, wait_until

ROUTER_PACKAGE = "vllm-router"
ROUTER_VERSION = "0.1.17"
VENV = Path(os.environ.get("FERRY_ROUTER_VENV", REPO / ".venv-router"))

# The router's knobs a test or a benchmark sets (flags of vllm-router 0.1.17).
FAST_FAILOVER = (
    "--health-check-interval-secs", "1", "--health-failure-threshold", "1",
    "--health-success-threshold", "1", "--health-check-timeout-secs", "2",
    "--worker-startup-check-interval", "1", "--worker-startup-timeout-secs", "120",
    "--retry-max-retries", "4", "--retry-initial-backoff-ms", "50",
    "--retry-max-backoff-ms", "400", "--cb-failure-threshold", "1",
    "--cb-success-threshold", "1", "--cb-timeout-duration-secs", "60",
)


def _installed_version(binary: Path) -> str | None:
    python = binary.parent / "python"
    try:
        out = subprocess.run([str(python), "-c", "import importlib.metadata as m; "
                              f"print(m.version({ROUTER_PACKAGE!r}))"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def router_binary(venv: Path = VENV) -> tuple[Path | None, str]:
    """(path of `vllm-router`, "") once the pinned version is installed, else (None, why)."""
    binary = venv / "bin" / "vllm-router"
    if binary.exists() and _installed_version(binary) == ROUTER_VERSION:
        return binary, ""
    lock = venv.parent / (venv.name + ".lock")
    import fcntl
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)      # two sessions creating it at once
        if binary.exists() and _installed_version(binary) == ROUTER_VERSION:
            return binary, ""
        if not (venv / "bin" / "python").exists():
            made = subprocess.run([sys.executable, "-m", "venv", str(venv)],
                                  capture_output=True, text=True)
            if made.returncode != 0:
                return None, f"python -m venv {venv} failed: {made.stderr[-500:]}"
        try:
            pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                                  "--disable-pip-version-check",
                                  f"{ROUTER_PACKAGE}=={ROUTER_VERSION}"],
                                 capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            return None, f"pip install {ROUTER_PACKAGE}=={ROUTER_VERSION} took over 900 s"
        if pip.returncode != 0 or not binary.exists():
            out = pip.stderr or pip.stdout
            errors = [l for l in out.splitlines() if l.startswith("ERROR")] or [out[-800:]]
            return None, (f"pip could not install {ROUTER_PACKAGE}=={ROUTER_VERSION} into "
                          f"{venv}: {' '.join(errors)[-800:]}")
    return binary, ""


def http_status(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return 0


@dataclass
class Router:
    binary: Path
    workers: list[str]
    policy: str = "cache_aware"
    extra: tuple[str, ...] = FAST_FAILOVER
    port: int = 0
    metrics_port: int = 0
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        head = ([str(self.binary)] if self.binary.name != "python"
                else [str(self.binary), "-m", "sglang_router.launch_router"])
        return [*head, "--host", "127.0.0.1", "--port", str(self.port),
                "--worker-urls", *self.workers, "--policy", self.policy,
                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(self.metrics_port),
                "--log-level", "info", *self.extra]

    def start(self, timeout_s: float = 60.0) -> Router:
        self.port = self.port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        self.args = self.command()
        fd, name = tempfile.mkstemp(prefix="ferry-router-", suffix=".log")
        self.log_path = Path(name)
        env = {**os.environ, "NO_COLOR": "1", "RUST_LOG_STYLE": "never"}
        self.proc = subprocess.Popen(self.args, stdout=fd, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        os.close(fd)
        try:
            wait_until(lambda: self.proc.poll() is not None
                       or http_status(self.url + "/health") == 200,
                       timeout_s, "the router to become healthy", interval=0.1)
        except TimeoutError:
            self.stop()
            raise
        if self.proc.poll() is not None:
            raise RuntimeError(f"vllm-router exited with {self.proc.returncode}:\n{self.log()}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=5) as resp:
            return resp.read().decode()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def kill_hard(d: Daemon) -> None:
    """SIGKILL a daemon's supervisor and all its children at once: a host that died."""
    assert d.proc is not None
    pids = [*d.child_pids(""), d.proc.pid]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    d.proc.wait(10)
    deadline = time.monotonic() + 10
    for pid in pids:
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
