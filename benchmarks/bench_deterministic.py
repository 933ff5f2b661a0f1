"""What deterministic mode costs: SmolLM2-135M Q4_1 (weight_format auto: int4), default against
`deterministic=True` forwards, alternating step by step so machine noise lands on both.

    python -m benchmarks.bench_deterministic [--threads 1] [--batches 1,8] [--steps 20]

Reported: the median decode step per batch size (64-token prompts) and a 256-token prefill.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.bench_llm_engine import BLOCK, PROMPT, gguf_path
from engines.llm.kv_cache import PagedKVCache
from engines.llm.model import ForwardBatch, LlamaModel, load_model


def _prefill(model: LlamaModel, kv: PagedKVCache, seqs: int, n: int, det: bool) -> float:
    nb = -(-(n + 64) // BLOCK)
    tables = [list(range(i * nb, (i + 1) * nb)) for i in range(seqs)]
    ids = torch.randint(3, model.cfg.vocab_size, (seqs * n,))
    pos = torch.arange(n).repeat(seqs)
    started = time.perf_counter()
    model(ForwardBatch(ids, pos, [n] * seqs, [n] * seqs, tables), kv, deterministic=det)
    return time.perf_counter() - started


def _decode(model: LlamaModel, kv: PagedKVCache, batch: int, at: int, det: bool) -> float:
    nb = -(-(PROMPT + 64) // BLOCK)
    tables = [list(range(i * nb, (i + 1) * nb)) for i in range(batch)]
    started = time.perf_counter()
    model(ForwardBatch(torch.randint(3, 1000, (batch,)), torch.full((batch,), at), [1] * batch,
                       [at + 1] * batch, tables), kv, deterministic=det)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(gguf_path(), weights="auto")
    print(f"weights {model.weight_format}, {args.threads} thread(s)")
    print("| measure | default | deterministic | cost |\n|---|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        kv = PagedKVCache(model.cfg, batch * 8 + 16, BLOCK, torch.float32, "cpu")
        _prefill(model, kv, batch, PROMPT, False)
        times: dict[bool, list[float]] = {False: [], True: []}
        for step in range(args.steps):
            for det in (False, True):
                times[det].append(_decode(model, kv, batch, PROMPT + step, det))
        a, b = statistics.median(times[False]), statistics.median(times[True])
        print(f"| decode step, batch {batch} | {a * 1e3:.1f} ms | {b * 1e3:.1f} ms "
              f"| {b / a:.2f}× |")
    kv = PagedKVCache(model.cfg, 40, BLOCK, torch.float32, "cpu")
    pre: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(3):
        for det in (False, True):
            pre[det].append(_prefill(model, kv, 1, 256, det))
    a, b = min(pre[False]), min(pre[True])
    print(f"| 256-token prefill | {a * 1e3:.0f} ms ({256 / a:.0f} tok/s) | {b * 1e3:.0f} ms "
          f"({256 / b:.0f} tok/s) | {b / a:.2f}× |")


if __name__ == "__main__":
    main()
