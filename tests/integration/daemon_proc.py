"""Start `ferry serve` the way users do (a real process, real sockets) and stop it cleanly."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHM = Path("/dev/shm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_json(req: urllib.request.Request | str, timeout: float) -> tuple[int, dict]:
    """(status, JSON body) of one request; error statuses are answers, not exceptions."""
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        return exc.code, json.loads(body) if body else {}


def http_get(url: str, timeout: float = 5.0) -> tuple[int, dict]:
    return request_json(url, timeout)


def wait_until(cond, timeout_s: float, what: str, interval: float = 0.05):
    """Poll `cond` until it returns a truthy value; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


def ferry_segments() -> set[str]:
    return {p.name for p in SHM.iterdir() if p.name.startswith("ferry-")}


def orphan_segments() -> set[str]:
    """Ferry segments whose owning process is gone: leaks."""
    out = set()
    for name in ferry_segments():
        pid = name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            out.add(name)
    return out


@dataclass
class Daemon:
    repo: Path
    workers: int = 2
    extra_config: str = ""          # more TOML tables after the generated ones
    server_extra: str = ""          # more keys inside [server]
    env: dict[str, str] = field(default_factory=dict)
    drain_grace_s: float = 20
    port: int = 0
    base: Path | None = None
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def runtime_dir(self) -> Path:
        assert self.base is not None
        return self.base / "run"

    @property
    def state_dir(self) -> Path:
        assert self.base is not None
        return self.base / "state"

    @property
    def zmq_endpoint(self) -> str:
        return f"ipc://{self.runtime_dir}/ferry.zmq"

    @property
    def config_path(self) -> Path:
        assert self.base is not None
        return self.base / "ferry.toml"

    def write_config(self, extra: str | None = None) -> None:
        text = f"""
[server]
host = "127.0.0.1"
port = {self.port}
workers = {self.workers}
drain_grace_s = {self.drain_grace_s}
{self.server_extra}
[paths]
state_dir = "{self.state_dir}"
runtime_dir = "{self.runtime_dir}"
model_repository = "{self.repo}"
[logging]
level = "info"
format = "json"
""" + (self.extra_config if extra is None else extra)
        self.config_path.write_text(text)

    def start(self, timeout_s: float = 120.0) -> Daemon:
        # ipc:// paths must stay under 107 bytes: keep the runtime dir short.
        self.base = Path(tempfile.mkdtemp(prefix="fy", dir="/tmp"))
        self.port = self.port or free_port()
        return self._launch(timeout_s, log_mode="wb")

    def _launch(self, timeout_s: float, log_mode: str) -> Daemon:
        """`ferry serve` on this base directory, as a user runs it; returns once ready."""
        assert self.base is not None
        self.write_config()
        self.log_path = self.base / "ferry.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "serve", "--config", str(self.config_path)],
            cwd=REPO, env=env, stdout=open(self.log_path, log_mode), stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: self._ready_or_dead(), timeout_s, "the daemon to become ready",
                       interval=0.1)
        except Exception:
            self.stop(check=False)
            raise
        if self.proc.poll() is not None:
            raise RuntimeError(f"ferry serve exited with {self.proc.returncode}:\n{self.log()}")
        return self

    def _ready_or_dead(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            return True
        try:
            return http_get(self.url + "/readyz", timeout=1.0)[0] == 200
        except (OSError, ValueError):
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def child_pids(self, role_prefix: str) -> list[int]:
        """PIDs of this daemon's children whose command line role starts with `role_prefix`."""
        out = []
        for proc_dir in Path("/proc").iterdir():
            if not proc_dir.name.isdigit():
                continue
            try:
                cmd = (proc_dir / "cmdline").read_bytes().split(b"\0")
                status = (proc_dir / "status").read_text()
            except OSError:
                continue
            ppid = next((int(l.split()[1]) for l in status.splitlines()
                         if l.startswith("PPid:")), 0)
            if ppid == self.proc.pid and len(cmd) > 3 and cmd[2] == b"daemon.child" \
                    and cmd[3].decode().startswith(role_prefix):
                out.append(int(proc_dir.name))
        return out

    def stop(self, check: bool = True, timeout_s: float = 60.0) -> int | None:
        code = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait()
        elif self.proc is not None:
            code = self.proc.returncode
        if self.base is not None and not check:
            shutil.rmtree(self.base, ignore_errors=True)
        return code
