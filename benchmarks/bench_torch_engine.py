"""The same small models through the torch engine and the ONNX Runtime engine, side by side in
one run on one machine:

1. engine alone (in-process, no sockets): median compute per batch at batch 1, 8 and 64 for ONNX
   Runtime, TorchScript, the exported program and the exported program under torch.compile, the
   variants interleaved round by round so that load on the host hits them alike;
2. through a Ferry daemon (ZMQ client, one-row requests, dynamic batching): closed-loop
   throughput and p50/p99 latency at a fixed concurrency, targets interleaved round by round.

Models: the digits CNN of the torch engine's tests ([B, 1, 8, 8] -> [B, 10]) and a 64-128-10 MLP
(seeded), each exported from one torch module to ONNX, TorchScript and .pt2, so every engine runs
the same weights. Every engine gets one intra-op thread (the host is a shared 2-core machine).

    python -m benchmarks.bench_torch_engine [--rounds 3] [--step-s 4] [--concurrency 16]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.loadgen import Report, run_closed  # noqa: E402
from benchmarks.targets import ZmqInfer  # noqa: E402
from tests.integration.daemon_proc import Daemon  # noqa: E402
from tests.torch_models import (cached_cnn, save_exported, save_onnx,  # noqa: E402
                                save_torchscript, write_version)

BATCHES = (1, 8, 64)
VARIANTS = {                 # name -> (engine, weights, [section] lines)
    "onnx": ("onnx", "model.onnx", "[onnx]\nintra_op_threads = 1\ninter_op_threads = 1\n"),
    "torchscript": ("torch", "model.pt", "[torch]\nnum_threads = 1\n"),
    "exported": ("torch", "model.pt2", "[torch]\nnum_threads = 1\n"),
    "exported+compile": ("torch", "model.pt2", "[torch]\nnum_threads = 1\ncompile = true\n"),
}


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                        torch.nn.Linear(128, 10))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.body(pixels / 16.0), dim=1)


def _toml(engine: str, weights: str, section: str, name: str, shape: list[int],
          out: str) -> str:
    return f"""engine = "{engine}"
weights = "{weights}"
max_batch_size = 64
[[inputs]]
name = "{name}"
dtype = "float32"
shape = {shape}
[[outputs]]
name = "{out}"
dtype = "float32"
shape = [-1, 10]
[batching]
max_queue_delay_us = 500
default_timeout_ms = 0
{section}"""


def build_repo(root: Path) -> dict[str, dict[str, Any]]:
    """models/<model>_<variant>/1 for both models and every variant; returns per model its
    input name, one-row example and repository names by variant."""
    cnn, _ = cached_cnn()
    models = {"cnn": (cnn, "image", [-1, 1, 8, 8], "logits", torch.zeros(2, 1, 8, 8)),
              "mlp": (MLP().eval(), "pixels", [-1, 64], "probabilities", torch.zeros(2, 64))}
    out: dict[str, dict[str, Any]] = {}
    rng = np.random.default_rng(0)
    for model, (module, name, shape, output, example) in models.items():
        names = {}
        for variant, (engine, weights, section) in VARIANTS.items():
            repo_name = f"{model}_{variant.replace('+', '_')}"
            d = write_version(root, repo_name, 1, {"model.toml": _toml(
                engine, weights, section, name, shape, output)})
            if weights == "model.onnx":
                save_onnx(module, d / weights, example, name, output)
            elif weights == "model.pt":
                save_torchscript(module, d / weights, example)
            else:
                save_exported(module, d / weights, example, name, max_batch=64)
            names[variant] = repo_name
        row = rng.uniform(0, 16, [1, *shape[1:]]).astype(np.float32)
        out[model] = {"input": name, "row": row, "names": names}
    return out


def engine_alone(root: Path, models: dict[str, dict[str, Any]], rounds: int,
                 reps: int) -> dict[str, Any]:
    """Median compute per batch, per model, variant and batch size; and load times."""
    from daemon.repository_spec import load_spec
    from engines.onnx.engine import OnnxEngine
    from engines.torch.engine import TorchEngine

    engines, loads = {}, {}
    for model, m in models.items():
        for variant, repo_name in m["names"].items():
            spec = load_spec(root / repo_name / "1", repo_name, 1)
            engine = OnnxEngine() if spec.engine == "onnx" else TorchEngine()
            t0 = time.perf_counter()
            engine.load(spec, "cpu")
            loads[(model, variant)] = time.perf_counter() - t0
            engines[(model, variant)] = engine
    torch.set_num_threads(1)
    times: dict[tuple[str, str, int], list[float]] = {}
    for _ in range(rounds):
        for (model, variant), engine in engines.items():
            m = models[model]
            for batch in BATCHES:
                feeds = {m["input"]: np.repeat(m["row"], batch, axis=0)}
                names = list(engine._outputs)
                engine._execute(names, feeds)                     # warm this shape
                for _ in range(reps):
                    t0 = time.perf_counter()
                    engine._execute(names, feeds)
                    times.setdefault((model, variant, batch), []).append(
                        time.perf_counter() - t0)
    return {"compute_us": {f"{m}/{v}/{b}": statistics.median(t) * 1e6
                           for (m, v, b), t in times.items()},
            "load_s": {f"{m}/{v}": s for (m, v), s in loads.items()}}


async def through_daemon(d: Daemon, models: dict[str, dict[str, Any]], rounds: int,
                         step_s: float, concurrency: int) -> dict[str, Any]:
    targets = {(model, variant): ZmqInfer(f"{model}/{variant}", d.zmq_endpoint, repo_name,
                                          {m["input"]: m["row"]})
               for model, m in models.items() for variant, repo_name in m["names"].items()}
    for t in targets.values():
        await t.open()
    reports: dict[tuple[str, str], list[Report]] = {}
    try:
        for _ in range(rounds):
            for key, target in targets.items():
                rep = await run_closed(target, concurrency, duration_s=step_s, warmup=20)
                reports.setdefault(key, []).append(rep.check())
    finally:
        for t in targets.values():
            await t.close()
    out = {}
    for (model, variant), reps in reports.items():
        merged = Report.merge(targets[(model, variant)], reps)
        out[f"{model}/{variant}"] = {"rps": merged.throughput_rps,
                                     "p50_ms": merged.latency_ms["p50"],
                                     "p99_ms": merged.latency_ms["p99"],
                                     "requests": merged.completed}
    return out


def render(r: dict[str, Any], concurrency: int) -> str:
    lines = ["| model | engine | compute b=1 | b=8 | b=64 | load | "
             f"req/s (c={concurrency}) | p50 | p99 | req/s vs onnx |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for model in ("cnn", "mlp"):
        base = r["daemon"][f"{model}/onnx"]["rps"]
        for variant in VARIANTS:
            key = f"{model}/{variant}"
            c = [r["engine"]["compute_us"][f"{key}/{b}"] for b in BATCHES]
            dm = r["daemon"][key]
            lines.append(f"| {model} | {variant} | {c[0]:.0f} µs | {c[1]:.0f} µs | "
                         f"{c[2]:.0f} µs | {r['engine']['load_s'][key]:.2f} s | "
                         f"{dm['rps']:.0f} | {dm['p50_ms']:.1f} ms | {dm['p99_ms']:.1f} ms | "
                         f"{dm['rps'] / base:.2f}× |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=200, help="engine-alone runs per batch size")
    ap.add_argument("--step-s", type=float, default=4.0, help="seconds per daemon target round")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "torch_engine.json"))
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="fyt", dir="/tmp"))
    models = build_repo(tmp / "models")
    results: dict[str, Any] = {"engine": engine_alone(tmp / "models", models, args.rounds,
                                                      args.reps)}
    d = Daemon(tmp / "models", workers=1, env={"FERRY_TORCH_THREADS": "1"}).start(
        timeout_s=300)
    try:
        results["daemon"] = asyncio.run(through_daemon(d, models, args.rounds, args.step_s,
                                                       args.concurrency))
    finally:
        assert d.stop() == 0
    results["torch"] = torch.__version__
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(render(results, args.concurrency))
    return 0


if __name__ == "__main__":
    sys.exit(main())
