"""One HTTP request with room for a generation on a loaded 2-core machine (the seeds'
documented examples ask for 50-200 tokens): (status, headers, JSON body or text)."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


def slow_call(d: Any, method: str, path: str, body: Any = None, *, key: str | None = None,
              headers: dict[str, str] | None = None, timeout_s: float = 200.0
              ) -> tuple[int, dict[str, str], Any]:
    h = dict(headers or {})
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        h.setdefault("Content-Type", "application/json")
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(d.url + path, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            status, out, raw = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        status, out, raw = exc.code, dict(exc.headers), exc.read()
    try:
        return status, out, json.loads(raw) if raw else None
    except ValueError:
        return status, out, raw.decode(errors="replace")


def stop_cleanly(d: Any) -> None:
    """Stop `d`; it exits 0 and leaves none of its own shared-memory segments behind (other
    daemons on this host, e.g. another suite's killed children, are not this test's)."""
    from tests.integration.daemon_proc import orphan_segments

    pids = {d.proc.pid, *d.child_pids("")}
    code = d.stop()
    assert code == 0, d.log()[-4000:]
    mine = {s for s in orphan_segments() if int(s.rsplit("-", 1)[-1]) in pids}
    assert not mine, f"shared-memory segments leaked: {sorted(mine)}"
