"""A `ferry serve` whose state directory is prepared before it starts and survives a restart,
plus small HTTP helpers for the security and batch tests."""
from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.integration.daemon_proc import REPO, Daemon, free_port


async def admin_and_infer_keys(state) -> dict[str, str]:
    """For `SecureDaemon.state`: an "admin" and an "infer" key, each with only its scope."""
    return {"admin": (await state.keys.create("admin", scopes=["admin"])).plaintext,
            "infer": (await state.keys.create("infer", scopes=["infer"])).plaintext}


@dataclass
class SecureDaemon(Daemon):
    log_bodies: bool = False

    def prepare(self) -> SecureDaemon:
        """Create the base directory and port, so keys can be made before the first start."""
        if self.base is None:
            self.base = Path(tempfile.mkdtemp(prefix="fy", dir="/tmp"))
            self.port = self.port or free_port()
        return self

    def write_config(self, extra: str | None = None) -> None:
        super().write_config(extra)
        if self.log_bodies:
            text = self.config_path.read_text().replace('format = "json"\n',
                                                        'format = "json"\nlog_bodies = true\n')
            self.config_path.write_text(text)

    def state(self, fn):
        """Run `await fn(state)` on this daemon's state database (real SQLite, in-process)."""
        from daemon.state import run_with_state
        return run_with_state(self.prepare().state_dir, fn)

    def start(self, timeout_s: float = 120.0) -> SecureDaemon:
        self.prepare()
        self._launch(timeout_s, log_mode="ab")        # one log across restarts
        return self

    def cli(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
        """`ferry ARGS --config <this daemon's config>` as a user runs it."""
        self.prepare()
        if not self.config_path.exists():
            self.write_config()
        return subprocess.run([sys.executable, "-m", "daemon.cli", *args, "--config",
                               str(self.config_path)], cwd=REPO, input=stdin, text=True,
                              capture_output=True, timeout=60)


def call(d: Daemon, method: str, path: str, *, key: str | None = None, body: Any = None,
         headers: dict[str, str] | None = None, raw: bytes | None = None,
         source: str | None = None) -> tuple[int, dict[str, str], Any]:
    """One request on a fresh connection: (status, headers, JSON body or text), from the
    loopback address `source` (127.x.y.z) when given, e.g. to stay under per-address limits."""
    h = dict(headers or {})
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        h.setdefault("Content-Type", "application/json")
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request(method, path, body=data, headers=h)
        resp = conn.getresponse()
        payload = resp.read()
        out_headers = {k: v for k, v in resp.getheaders()}
        try:
            parsed: Any = json.loads(payload) if payload else None
        except ValueError:
            parsed = payload.decode(errors="replace")
        return resp.status, out_headers, parsed
    finally:
        conn.close()


def error_code(body: Any) -> str | None:
    """The stable code of either error shape (OpenAI-style nested, or KServe's flat one)."""
    if not isinstance(body, dict):
        return None
    err = body.get("error")
    return err.get("code") if isinstance(err, dict) else body.get("code")


def run(coro, timeout_s: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))
