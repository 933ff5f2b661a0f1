"""The load generator against a real daemon: it counts completions exactly and fails loudly
when the target answers with errors (benchmarks/loadgen.py, benchmarks/targets.py)."""
from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import loadgen as L
from benchmarks import targets as T
from tests.integration.daemon_proc import REPO

pytestmark = pytest.mark.timeout(180)


def _pixels() -> dict[str, np.ndarray]:
    from daemon.demo import digits_split
    return {"pixels": digits_split()[1][:1].astype(np.float32)}


def _run(target, **kw) -> L.Report:
    async def go() -> L.Report:
        await target.open()
        try:
            if "rate" in kw:
                return await L.run_open(target, kw.pop("rate"), **kw)
            return await L.run_closed(target, kw.pop("concurrency"), **kw)
        finally:
            await target.close()
    return asyncio.run(go())


@pytest.mark.parametrize("kind", ["kserve-json", "kserve-binary", "zmq", "zmq-shm"])
def test_closed_loop_of_n_requests_reports_n_completions(daemon, kind):
    x = _pixels()
    infer = f"{daemon.url}/v2/models/digits/infer"
    if kind == "kserve-json":
        target = T.HttpPost(kind, infer, T.kserve_json_body(x), expect=b'"outputs"')
    elif kind == "kserve-binary":
        body, headers = T.kserve_binary_body(x)
        target = T.HttpPost(kind, infer, body, headers=headers, expect=b'"outputs"')
    else:
        target = T.ZmqInfer(kind, daemon.zmq_endpoint, "digits", x, use_shm=kind == "zmq-shm",
                            region_bytes=1 << 20)
    rep = _run(target, concurrency=4, requests=50, warmup=2).check()
    assert (rep.requests, rep.completed, rep.errors) == (50, 50, 0)
    assert rep.latency_ms["p50"] > 0 and rep.throughput_rps > 0


def test_open_loop_against_the_daemon(daemon):
    target = T.HttpPost("kserve-json", f"{daemon.url}/v2/models/digits/infer",
                        T.kserve_json_body(_pixels()), expect=b'"outputs"')
    rep = _run(target, rate=100.0, requests=60, seed=2).check()
    assert rep.completed == 60 and rep.mode == "open"


def test_error_responses_are_counted_and_fail_the_run(daemon):
    target = T.HttpPost("missing", f"{daemon.url}/v2/models/no-such-model/infer",
                        T.kserve_json_body(_pixels()), expect=b'"outputs"')
    rep = _run(target, concurrency=2, requests=6)
    assert (rep.completed, rep.errors) == (0, 6)
    assert "HTTP 404" in rep.error_examples[0]
    with pytest.raises(L.LoadError):
        rep.check()
    bad = T.ZmqInfer("zmq-bad", daemon.zmq_endpoint, "digits", {"pixels": np.ones((1, 3),
                                                                                  np.float32)})
    rep = _run(bad, concurrency=2, requests=4)
    assert rep.errors == 4 and rep.completed == 0


def _cli(daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.loadgen", "--url", daemon.url,
                           "--zmq", daemon.zmq_endpoint, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_exits_zero_on_success_and_nonzero_on_errors(daemon, tmp_path):
    out = tmp_path / "r.json"
    ok = _cli(daemon, "--target", "zmq", "--model", "digits", "--concurrency", "2",
              "--requests", "20", "--out", str(out))
    assert ok.returncode == 0, ok.stderr
    assert '"completed": 20' in out.read_text()
    bad = _cli(daemon, "--target", "kserve-json", "--model", "no-such-model", "--concurrency",
               "1", "--requests", "3")
    assert bad.returncode != 0
