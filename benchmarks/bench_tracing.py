"""What tracing costs a request, with it off and on.

1. In process, CPU time (time.process_time, best of 7, so a busy host does not blur
   microseconds): an Infer + InferResult pair's encode and decode untraced and traced (the
   `trace` and `timing` header fields), the dispatcher's check outside a traced task, and the
   span bookkeeping of one traced request (server span, ferry.dispatch, engine.queue,
   engine.execute).
2. End to end (`--e2e`): the ZMQ client's round trip on an identity model with `[tracing]
   enabled = false`, `true` (every request traced) and `true` with `sample_ratio = 0.01`,
   daemons started in turn so drift in the host's load hits each; beside the wall-clock p50,
   the CPU time the ZMQ frontend and the engine process spent per request (from
   /proc/<pid>/stat, so a busy host inflates it far less than the round trip).

    python -m benchmarks.bench_tracing [--e2e] [--rounds 3] [--n 1000]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from daemon import protocol as P  # noqa: E402
from frontends import spans as S  # noqa: E402

_TRACE = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"


def cpu_us(fn: Callable[[], Any], n: int = 20000) -> float:
    best = min(timeit.repeat(fn, number=n, repeat=7, timer=time.process_time))
    return round(best / n * 1e6, 3)


def _pair(traced: bool) -> tuple[P.Infer, P.InferResult]:
    infer = P.Infer("a" * 32, "identity", 1, [P.TensorRef("x", "float32", (64,), frame=0)],
                    request_id="r" * 32, trace=_TRACE if traced else "")
    result = P.InferResult("a" * 32, [P.TensorRef("y", "float32", (64,), frame=0)], 10, 20, 1,
                           timing=[1 << 40] * 3 if traced else None)
    return infer, result


def in_process() -> dict[str, Any]:
    x = np.ones(64, np.float32)
    out: dict[str, Any] = {}
    for label, traced in (("untraced", False), ("traced", True)):
        infer, result = _pair(traced)
        frames = P.encode(infer, [x]), P.encode(result, [x])
        out[label] = {
            "encode_us": cpu_us(lambda: (P.encode(infer, [x]), P.encode(result, [x]))),
            "decode_us": cpu_us(lambda: (P.decode(frames[0]), P.decode(frames[1]))),
            "header_bytes": [len(frames[0][0]), len(frames[1][0])]}
    out["dispatch_check_off_us"] = cpu_us(lambda: S.DispatchSpan.begin("cpu", "identity", 1))
    tracer = S.Tracer("bench")
    reply = _pair(True)[1]

    def one_request() -> None:
        server = S.ServerSpan(tracer, None, "ZMQ infer")
        dispatch = S.DispatchSpan.begin("cpu", "identity", 1)
        assert dispatch is not None and dispatch.traceparent
        dispatch.reply = reply
        dispatch.finish()
        server.end(False, **{"rpc.system": "ferry-zmq", "ferry.model": "identity",
                             "ferry.request_id": "r"})
        tracer.pending.clear()
    out["spans_per_request_us"] = cpu_us(one_request, n=5000)
    return out


def end_to_end(rounds: int, n: int) -> dict[str, Any]:
    from benchmarks.bench_transport import ferry_zmq_rtt, make_identity_repo
    from tests.integration.daemon_proc import Daemon
    repo = make_identity_repo(Path(tempfile.mkdtemp(prefix="fyb", dir="/tmp")) / "models")
    configs = {"off": "enabled = false", "on": "enabled = true",
               "on_sampled_1pct": "enabled = true\nsample_ratio = 0.01"}
    p50: dict[str, list[float]] = {label: [] for label in configs}
    cpu: dict[str, dict[str, list[float]]] = {label: {"zmq": [], "engine": []}
                                              for label in configs}
    for _ in range(rounds):
        for label, section in configs.items():
            d = Daemon(repo, workers=1, extra_config=f"[tracing]\n{section}\n").start()
            try:
                pids = {role: d.child_pids(role)[0] for role in ("zmq", "engine")}
                ferry_zmq_rtt(200, d.zmq_endpoint, np.ones(64, np.float32))    # warm
                for _ in range(3):
                    before = {role: _cpu_s(pid) for role, pid in pids.items()}
                    p50[label].append(ferry_zmq_rtt(n, d.zmq_endpoint,
                                                    np.ones(64, np.float32))[0]["p50_us"])
                    for role, pid in pids.items():   # ferry_zmq_rtt sends n + 100
                        cpu[label][role].append((_cpu_s(pid) - before[role]) / (n + 100) * 1e6)
            finally:
                assert d.stop() == 0
    return {label: {"p50_us_runs": [round(v, 1) for v in runs],
                    "median_p50_us": round(statistics.median(runs), 1),
                    **{f"median_{role}_cpu_us_per_request": round(statistics.median(v), 1)
                       for role, v in cpu[label].items()}}
            for label, runs in p50.items()}


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--e2e", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args(argv)
    result: dict[str, Any] = {"in_process": in_process()}
    if args.e2e:
        result["zmq_round_trip"] = end_to_end(args.rounds, args.n)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
