"""MiniLM embeddings: Ferry vs Ray Serve vs BentoML, throughput at equal p99.

Every system serves the same ONNX file (the demo repository's minilm/1/model.onnx) with ONNX
Runtime on the CPU, with its own dynamic batching, and gets the same request: one fixed English
sentence, pre-tokenized ([1, S] int64 ids and mask), as JSON over HTTP. Ferry is also driven
through the KServe binary extension and its ZMQ client (inline and shm) for reference.

For each system: a short closed-loop run estimates its capacity, then open-loop Poisson runs at
fractions of it climb until p99 exceeds the common bound. A system's score is the highest
throughput it sustained with p99 ≤ the bound and no errors.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks import targets as T
from benchmarks.loadgen import (LoadError, Report, best_under_bound, run_closed, run_open,
                                sweep_open)
from benchmarks.peers import venvs
from benchmarks.peers.process import PeerFailed, PeerProcess

__all__ = ["TensorConfig", "SystemResult", "SENTENCE", "minilm_inputs", "measure",
           "measure_interleaved", "ferry_targets", "ray_peer", "bentoml_peer", "run_peer"]

log = logging.getLogger(__name__)

SENTENCE = ("A ferry carries passengers and their cars across the river every morning, "
            "weather permitting.")
RATE_FRACTIONS = (0.05, 0.1, 0.25, 0.5, 0.7, 0.85, 1.0, 1.15)


@dataclass(slots=True)
class TensorConfig:
    p99_bound_ms: float = 100.0
    capacity_s: float = 5.0           # closed-loop capacity estimate per system
    step_s: float = 6.0               # each open-loop rate
    concurrency: int = 16             # of the capacity estimate
    sweep_ferry_extras: bool = False  # also sweep binary / zmq (else closed loop only)


@dataclass(slots=True)
class SystemResult:
    name: str
    capacity: Report | None = None
    sweep: list[Report] = field(default_factory=list)
    best: Report | None = None
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "error": self.error,
                "capacity": self.capacity.to_dict() if self.capacity else None,
                "sweep": [r.to_dict() for r in self.sweep],
                "best": self.best.to_dict() if self.best else None}


def minilm_inputs(model_dir: Path) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = np.asarray([tok.encode(SENTENCE).ids], np.int64)                  # [1, S]
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


async def measure(target: Any, cfg: TensorConfig, sweep: bool = True) -> SystemResult:
    res = SystemResult(target.name)
    await target.open()
    try:
        res.capacity = await run_closed(target, cfg.concurrency, duration_s=cfg.capacity_s,
                                        warmup=20, timeout_s=30.0)
        log.info("%s", res.capacity.line())
        res.capacity.check()
        if sweep:
            cap = res.capacity.throughput_rps
            res.sweep = await sweep_open(target, [f * cap for f in RATE_FRACTIONS],
                                         duration_s=cfg.step_s, p99_bound_ms=cfg.p99_bound_ms,
                                         warmup=0)
            res.best = best_under_bound(res.sweep, cfg.p99_bound_ms)
    except Exception as exc:   # recorded in the results; the other systems still run
        log.exception("%s failed", target.name)
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        await target.close()
    return res


async def measure_interleaved(targets: list[Any], swept: set[str],
                              cfg: TensorConfig) -> list[SystemResult]:
    """Capacity of every target, then the open-loop rates with the systems taking turns at
    each step (each at the same fraction of its own capacity), so a stall elsewhere on the
    machine hits them alike. A system leaves the sweep after two misses in a row."""
    results = {t.name: SystemResult(t.name) for t in targets}
    for t in targets:
        await t.open()
    try:
        for t in targets:
            res = results[t.name]
            try:
                res.capacity = (await run_closed(t, cfg.concurrency, duration_s=cfg.capacity_s,
                                                 warmup=20, timeout_s=30.0)).check()
                log.info("%s", res.capacity.line())
            except LoadError as exc:
                res.error = str(exc)
        misses = {n: 0 for n in swept if results[n].capacity is not None}
        for k, frac in enumerate(RATE_FRACTIONS):
            for t in targets:
                if misses.get(t.name, 2) >= 2:
                    continue
                res = results[t.name]
                rep = await run_open(t, frac * res.capacity.throughput_rps,
                                     duration_s=cfg.step_s, timeout_s=30.0, seed=k,
                                     first_index=(k + 1) * 100_000)
                log.info("%s", rep.line())
                res.sweep.append(rep)
                ok = not rep.errors and rep.latency_ms and rep.latency_ms["p99"] <= cfg.p99_bound_ms
                misses[t.name] = 0 if ok else misses[t.name] + 1
        for res in results.values():
            res.best = best_under_bound(res.sweep, cfg.p99_bound_ms) if res.sweep else None
    finally:
        for t in targets:
            await t.close()
    return list(results.values())


def ferry_targets(url: str, zmq: str, inputs: dict[str, np.ndarray]) -> list[Any]:
    infer = f"{url}/v2/models/minilm/infer"
    body, headers = T.kserve_binary_body(inputs)
    return [
        T.HttpPost("ferry-kserve-json", infer, T.kserve_json_body(inputs), expect=b'"outputs"'),
        T.HttpPost("ferry-kserve-binary", infer, body, headers=headers, expect=b'"outputs"'),
        T.ZmqInfer("ferry-zmq-inline", zmq, "minilm", inputs),
        T.ZmqInfer("ferry-zmq-shm", zmq, "minilm", inputs, use_shm=True),
    ]


def ray_peer(onnx: Path, port: int) -> tuple[PeerProcess, Callable[[dict], Any]]:
    py = venvs.ensure("ray")
    proc = PeerProcess("ray-serve", [str(py), str(Path(__file__).parent / "peers" / "ray_app.py"),
                                     "--onnx", str(onnx), "--port", str(port)],
                       f"http://127.0.0.1:{port}/", venvs.LOGS / "peer-ray.log",
                       env={"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"})
    return proc, lambda inputs: T.HttpPost(
        "ray-serve", f"http://127.0.0.1:{port}/",
        json.dumps({k: v.tolist() for k, v in inputs.items()}).encode(),
        expect=b'"embeddings"')


def bentoml_peer(onnx: Path, port: int) -> tuple[PeerProcess, Callable[[dict], Any]]:
    py = venvs.ensure("bentoml")
    repo = Path(__file__).resolve().parents[1]
    proc = PeerProcess("bentoml", [str(py), "-m", "bentoml", "serve",
                                   "benchmarks.peers.bentoml_service:MiniLM", "--host",
                                   "127.0.0.1", "--port", str(port)],
                       f"http://127.0.0.1:{port}/readyz", venvs.LOGS / "peer-bentoml.log",
                       env={"BENCH_ONNX": str(onnx), "BENTOML_DO_NOT_TRACK": "True"}, cwd=repo)

    def target(inputs: dict[str, np.ndarray]) -> Any:
        tokens = np.stack([inputs["input_ids"], inputs["attention_mask"]], axis=1)  # [B, 2, S]
        return T.HttpPost("bentoml", f"http://127.0.0.1:{port}/embed",
                          json.dumps({"tokens": tokens.tolist()}).encode(), expect=b"[")
    return proc, target


PeerMaker = Callable[[Path, int], tuple[PeerProcess, Callable[[dict], Any]]]


def run_peer(make: PeerMaker, name: str, onnx: Path, port: int,
             inputs: dict[str, np.ndarray], cfg: TensorConfig) -> SystemResult:
    try:
        proc, target_of = make(onnx, port)
        proc.start(timeout_s=240.0)
    except (PeerFailed, venvs.PeerUnavailable, OSError) as exc:
        log.error("%s unavailable: %s", name, exc)
        return SystemResult(name, error=f"{type(exc).__name__}: {exc}")
    try:
        return asyncio.run(measure(target_of(inputs), cfg))
    finally:
        proc.stop()
