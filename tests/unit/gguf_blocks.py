"""GGUF block encoders the `gguf` package lacks (it quantizes Q4_0, Q4_1, Q5_x and Q8_0 only):
Q4_K and IQ4_NL, written from the block layouts llama.cpp documents (ggml-common.h) and checked
against gguf's own dequantizers. Plain min/max rounding, not llama.cpp's iterative search: the
tests need files in the format, not the best such file.
"""
from __future__ import annotations

import numpy as np

__all__ = ["IQ4_NL_VALUES", "quantize", "quantize_iq4_nl", "quantize_q4_k"]

IQ4_NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89,
                          113], dtype=np.float32)


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(*x.shape[:-1], -1)


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo.astype(np.uint8) | (hi.astype(np.uint8) << 4)).astype(np.uint8)


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """[O, I] float (I a multiple of 256) -> Q4_K bytes [O, I / 256 * 144]."""
    o = w.shape[0]
    x = w.astype(np.float32).reshape(-1, 8, 32)                          # [N, 8 sub-blocks, 32]
    lo = np.minimum(x.min(-1), 0.0)                                      # [N, 8]
    scale = (x.max(-1) - lo) / 15.0
    d = np.maximum(scale.max(-1, keepdims=True) / 63.0, 1e-10).astype(np.float16)   # [N, 1]
    dmin = np.maximum(-lo.min(-1, keepdims=True) / 63.0, 1e-10).astype(np.float16)
    d32, dmin32 = d.astype(np.float32), dmin.astype(np.float32)
    sc = np.clip(np.rint(scale / d32), 1, 63).astype(np.uint8)          # [N, 8] 6-bit
    mn = np.clip(np.rint(-lo / dmin32), 0, 63).astype(np.uint8)
    step = (d32 * sc)[..., None]
    q = np.clip(np.rint((x + (dmin32 * mn)[..., None]) / step), 0, 15)  # [N, 8, 32]
    scales = np.concatenate([
        sc[:, :4] | ((sc[:, 4:] >> 4) << 6),                            # bytes 0-3
        mn[:, :4] | ((mn[:, 4:] >> 4) << 6),                            # bytes 4-7
        (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)], axis=-1)         # bytes 8-11
    qs = _nibbles(q[:, 0::2], q[:, 1::2]).reshape(-1, 128)              # runs of sub-block pairs
    blocks = np.concatenate([_f16(d), _f16(dmin), scales.astype(np.uint8), qs], axis=-1)
    return blocks.reshape(o, -1)


def quantize_iq4_nl(w: np.ndarray) -> np.ndarray:
    """[O, I] float -> IQ4_NL bytes [O, I / 32 * 18]: d * grid[q] per block of 32."""
    o = w.shape[0]
    x = w.astype(np.float32).reshape(-1, 32)
    amax = np.abs(x).max(-1, keepdims=True)
    d = np.maximum(amax / 127.0, 1e-10).astype(np.float16)              # [N, 1]
    q = np.abs(x[..., None] / d.astype(np.float32)[..., None] - IQ4_NL_VALUES).argmin(-1)
    blocks = np.concatenate([_f16(d), _nibbles(q[:, :16], q[:, 16:])], axis=-1)
    return blocks.reshape(o, -1)


def quantize(w: np.ndarray, qtype_name: str) -> np.ndarray:
    """Bytes of `w` in the named GGUF type, from these encoders or the gguf package's."""
    if qtype_name == "Q4_K":
        return quantize_q4_k(w)
    if qtype_name == "IQ4_NL":
        return quantize_iq4_nl(w)
    import gguf
    from gguf import quants
    return quants.quantize(w, gguf.GGMLQuantizationType[qtype_name])
