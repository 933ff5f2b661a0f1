"""Requests sent to a chosen HTTP worker of a multi-worker daemon: a fresh connection is opened
until the kernel (SO_REUSEPORT) hands it to the wanted worker, which is read from the worker's
own socket table (psutil), not guessed."""
from __future__ import annotations

import http.client
import json
import time
from typing import Any

import psutil

__all__ = ["worker_of", "on_worker"]


def worker_of(d: Any, conn: http.client.HTTPConnection) -> int:
    """The pid of the HTTP worker holding the other end of `conn` (connected). A connection the
    kernel completed sits in a listening socket's queue until a worker accepts it, in no
    process's table: a busy worker may take a while, so this looks again for up to 10 s."""
    port = conn.sock.getsockname()[1]
    deadline = time.monotonic() + 10
    while True:
        for pid in d.child_pids("http"):
            for c in psutil.Process(pid).net_connections(kind="tcp"):
                if c.raddr and c.raddr.port == port:
                    return pid
        if time.monotonic() > deadline:
            raise AssertionError("no worker holds the connection")
        time.sleep(0.01)


def on_worker(d: Any, pid: int | None, method: str, path: str, body: Any = None,
              key: str | None = None, avoid: int | None = None,
              headers: dict[str, str] | None = None) -> tuple[int, int, Any, dict[str, str]]:
    """Send on fresh connections until one lands on worker `pid` (or on any worker but
    `avoid`): (worker pid, status, JSON body or text, headers)."""
    h = dict(headers or {})
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    data = None
    if body is not None:
        data = json.dumps(body)
        h["Content-Type"] = "application/json"
    for _ in range(400):
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=120)
        try:
            conn.connect()
            worker = worker_of(d, conn)
            if (pid is not None and worker != pid) or worker == avoid:
                continue
            conn.request(method, path, body=data, headers=h)
            resp = conn.getresponse()
            raw = resp.read()
            try:
                parsed: Any = json.loads(raw) if raw else None
            except ValueError:
                parsed = raw.decode(errors="replace")
            return worker, resp.status, parsed, dict(resp.getheaders())
        finally:
            conn.close()
    raise AssertionError("the kernel never spread connections over the workers")
