"""Decode step time on an idle host and on a busy one, per OpenMP waiting policy (issue 18.5).

    python -m benchmarks.bench_busy_host [--threads 2] [--steps 40] [--competitors 1]

A shared host is the normal case: when another CPU-bound process runs on one of the cores,
PyTorch's OpenMP threads that spin while they wait for work take the CPU from the thread that
has it, and a decode step of two threads can take ten times as long as on an idle host. Each
variant runs in a fresh process (OpenMP reads its environment once, at start), decoding with the
int4 SmolLM2 model at batch 1 and 4, first on the host as it is, then with `--competitors`
busy-looping processes beside it. Reported: the median step per case and busy / idle per
variant. "Ferry's default" is what the supervisor gives engine processes: the environment of
daemon/children.py `compute_env` and `default_threads()` threads (the usable CPUs less one).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from daemon.children import compute_env, default_threads  # noqa: E402

BATCHES = (1, 4)
_SPIN = "while True: pass"


def probe(threads: int, steps: int) -> dict[str, float]:
    """Median decode step (ms) per batch size, in this process."""
    import torch

    from benchmarks.bench_llm_engine import Decoder, gguf_path
    from engines.llm.model import load_model
    torch.set_num_threads(threads)
    model = load_model(gguf_path(), weights="int4")
    out = {}
    for batch in BATCHES:
        d = Decoder(model, batch, steps + 5)
        for _ in range(5):
            d.step()
        out[str(batch)] = statistics.median(d.step() for _ in range(steps)) * 1e3
    return out


def run_probe(env: dict[str, str], threads: int, steps: int) -> dict[str, float]:
    full = {k: v for k, v in os.environ.items()
            if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    full.update(env)
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_busy_host", "--probe",
                           "--threads", str(threads), "--steps", str(steps)],
                          cwd=REPO, env=full, capture_output=True, text=True, timeout=600,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--competitors", type=int, default=1)
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.threads, args.steps)))
        return 0
    ferry = {k: v for k, v in compute_env({}).items() if k in ("OMP_WAIT_POLICY",
                                                               "GOMP_SPINCOUNT")}
    spin = " ".join(f"{k}={v}" for k, v in ferry.items())
    n = args.threads
    variants = [(f"{n} threads, library default (spin)", {}, n),
                (f"{n} threads, {spin}", ferry, n),
                (f"{n} threads, OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}, n),
                ("one thread", {}, 1),
                (f"Ferry's default: {default_threads()} thread(s) (usable CPUs less one), {spin}",
                 ferry, default_threads())]
    results: dict[str, dict[str, dict[str, float]]] = {}
    for load in ("idle", "busy"):
        competitors = [subprocess.Popen([sys.executable, "-c", _SPIN])
                       for _ in range(args.competitors if load == "busy" else 0)]
        try:
            time.sleep(0.5 if competitors else 0)
            for name, env, threads in variants:
                results.setdefault(name, {})[load] = run_probe(env, threads, args.steps)
        finally:
            for p in competitors:
                p.kill()
                p.wait()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"int4 SmolLM2-135M decode, median of {args.steps} steps, busy = "
          f"{args.competitors} busy-looping process(es) beside it\n")
    print("| waiting policy | " + " | ".join(
        f"batch {b} idle | batch {b} busy | busy / idle" for b in BATCHES) + " |")
    print("|---" * (1 + 3 * len(BATCHES)) + "|")
    for name, by_load in results.items():
        cells = []
        for b in map(str, BATCHES):
            idle, busy = by_load["idle"][b], by_load["busy"][b]
            cells += [f"{idle:.1f} ms", f"{busy:.1f} ms", f"{busy / idle:.2f}×"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
