"""Weight-only int8 and int4 matrices for the CPU decoder.

A decode step of a small model on a CPU is bound by reading the weights: SmolLM2-135M moves
~540 MB per step in float32. Stored as int8 with one scale per output row it moves ~135 MB, and
torch's `_weight_int8pack_mm` (bfloat16 activations, AVX512-BF16 kernels) runs a 1-row product
about 3x faster than the float32 GEMV on the 2-core EPYC of benchmarks/RESULTS.md, and the
[49152, 576] LM head about 10x faster.

That kernel does not scale with rows (it is a GEMV per row): from ~16 rows a bfloat16 GEMM
through oneDNN wins, ~3x at 256 rows. So each matrix keeps a bfloat16 copy for wide steps
(prefill chunks, big decode batches), made from the quantized values, so the two paths differ
only by bfloat16 rounding. That is still enough to break a greedy near-tie differently when the
same token is computed once by each path (a prefix-cache hit recomputes a prompt's tail in a
narrow step that a miss computed in a wide one): see README, "weight_format".

Activations stay float32 between matrices (residual stream, norms, RoPE, attention, KV cache);
only the products run in bfloat16.

Int4Weight halves the bytes again: 4-bit values in groups of 32 along the input dimension, each
group with a bfloat16 scale and zero (w = (q - 8) * scale + zero), for torch's CPU int4 kernel.
GGUF's affine 4-bit blocks map onto it with the file's own 4-bit values (`Int4Groups`, built by
the GGUF loader): Q4_0 (w = d * (q - 8): scale d, zero 0), Q4_1 (w = d * q + m: zero m + 8d) and
Q4_K (32-value sub-blocks, w = d*sc * q - dmin*m); only the scale and zero round to bfloat16.
A matrix that is not 4-bit to begin with is re-quantized per group by its min/max, which is
lossy. IQ4_NL/IQ4_XS (a non-linear grid) cannot be represented. The LM head stays int8.

`weight_format = "auto"` decides per matrix (`pick_auto`): the first of int4 (from the file's
own blocks only), int8 whose relative error against the file's dequantized weights,
||W' - W|| / ||W||, is at most AUTO_MAX_ERROR; else the matrix stays float.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["AUTO_MAX_ERROR", "BlockWeight", "DETERMINISTIC_ROWS", "Int4Groups", "Int4Weight",
           "Int8Weight", "QuantizedWeight", "WEIGHT_FORMATS", "cpu_has_fast_bf16", "fixed_rows",
           "int4_supported", "int8_available", "linear", "pick_auto", "relative_error",
           "resolve_weight_format"]

WEIGHT_FORMATS = ("auto", "float", "int8", "int4")
NARROW_ROWS = 8          # up to this many rows the int8 GEMV beats the bfloat16 GEMM (measured)
INT4_GROUP = 32          # values per scale/zero pair: a GGUF Q4 block
DETERMINISTIC_ROWS = 32  # rows per float GEMM call in deterministic mode (fixed_rows)
# `auto` keeps a matrix quantized only when ||W' - W|| / ||W|| against the file's weights is at
# most this (README, "weight_format", has the measured errors per GGUF type).
AUTO_MAX_ERROR = 0.02


@dataclass(slots=True)
class Int4Groups:
    """A matrix stored exactly as 4-bit groups of INT4_GROUP: w = (q - 8) * scale + zero."""

    q: torch.Tensor          # [O, I] uint8, 0..15
    scale: torch.Tensor      # [O, I / G] float32
    zero: torch.Tensor       # [O, I / G] float32

    def rows(self, index: slice) -> Int4Groups:
        return Int4Groups(self.q[index], self.scale[index], self.zero[index])

    @staticmethod
    def cat(parts: list[Int4Groups]) -> Int4Groups:
        return Int4Groups(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                          torch.cat([p.zero for p in parts]))


class QuantizedWeight:
    """A matrix whose narrow products (up to NARROW_ROWS rows) run on a low-bit kernel and wider
    ones on a bfloat16 GEMM over `wide` (None: always the kernel), activations in bfloat16."""

    __slots__ = ("wide",)
    wide: torch.Tensor | None

    def _narrow(self, xb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def nbytes(self) -> int:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.to(torch.bfloat16)                                        # [T, I]
        if x.shape[0] <= NARROW_ROWS or self.wide is None:
            y = self._narrow(xb)                                         # [T, O]
        else:
            y = F.linear(xb, self.wide)
        return y.to(x.dtype)


class Int8Weight(QuantizedWeight):
    """An [out, in] matrix as int8 rows with bfloat16 scales, plus an optional bfloat16 copy."""

    __slots__ = ("q", "scale")

    def __init__(self, weight: torch.Tensor, keep_wide: bool = True) -> None:
        w = weight.detach().float()                                      # [O, I]
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)           # [O]
        self.scale = scale.to(torch.bfloat16)
        # Quantize against the bfloat16-rounded scale: that is the scale the kernel multiplies by.
        self.q = torch.round(w / self.scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        self.wide = self.dequantize().to(torch.bfloat16) if keep_wide else None

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.float()[:, None]             # [O, I] float32

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Selected rows as float32: an embedding lookup from a tied, quantized table."""
        return self.q[index].float() * self.scale[index].float()[:, None]

    def nbytes(self) -> int:
        wide = self.wide.numel() * 2 if self.wide is not None else 0
        return self.q.numel() + self.scale.numel() * 2 + wide

    def _narrow(self, xb: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(xb, self.q, self.scale)


class Int4Weight(QuantizedWeight):
    """An [out, in] matrix as 4-bit groups packed for `_weight_int4pack_mm_for_cpu`, plus a
    bfloat16 copy (of the 4-bit values, so both paths use the same weights) for wide steps."""

    __slots__ = ("packed", "scales_zeros")
    wide: torch.Tensor

    def __init__(self, weight: torch.Tensor | Int4Groups) -> None:
        """From a float matrix (re-quantized per group by its min/max: lossy unless it already
        is 4-bit per group) or from a file's own groups (exact up to bfloat16 scale and zero)."""
        if isinstance(weight, Int4Groups):
            q = weight.q.float()                                         # [O, I]
            o, i = q.shape
            q = q.reshape(o, i // INT4_GROUP, INT4_GROUP)                # [O, I/G, G]
            scale = weight.scale.to(torch.bfloat16).float()              # [O, I/G]
            zero = weight.zero.to(torch.bfloat16).float()
        else:
            w = weight.detach().float()                                  # [O, I]
            o, i = w.shape
            groups = w.reshape(o, i // INT4_GROUP, INT4_GROUP)           # [O, I/G, G]
            lo, hi = groups.amin(-1), groups.amax(-1)                    # [O, I/G]
            # The kernel multiplies by bfloat16 scales and zeros: quantize against those.
            scale = ((hi - lo) / 15.0).clamp(min=1e-8).to(torch.bfloat16).float()
            zero = (lo + 8.0 * scale).to(torch.bfloat16).float()
            q = torch.round((groups - zero[..., None]) / scale[..., None] + 8.0).clamp(0, 15)
        self.packed = torch._convert_weight_to_int4pack_for_cpu(
            q.to(torch.int32).reshape(o, i), 2)
        self.scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1) \
            .contiguous().to(torch.bfloat16)                             # [I/G, O, 2]
        deq = (q - 8.0) * scale[..., None] + zero[..., None]             # [O, I/G, G]
        self.wide = deq.reshape(o, i).to(torch.bfloat16)

    @property
    def shape(self) -> torch.Size:
        return self.wide.shape

    def dequantize(self) -> torch.Tensor:
        return self.wide.float()

    def nbytes(self) -> int:
        return (self.packed.numel() * self.packed.element_size()
                + self.scales_zeros.numel() * 2 + self.wide.numel() * 2)

    def _narrow(self, xb: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(xb, self.packed, INT4_GROUP, self.scales_zeros)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact|| / ||exact|| (Frobenius; float32 sums are ample for errors of 1e-3)."""
    with torch.no_grad():
        norm = float(torch.linalg.vector_norm(exact))
        return float(torch.linalg.vector_norm(approx - exact)) / norm if norm else 0.0


def pick_auto(weight: torch.Tensor, groups: Int4Groups | None, head: bool = False
              ) -> tuple[torch.Tensor | Int8Weight | Int4Weight, float]:
    """`auto` for one float matrix: int4 from the file's own groups, else int8, whichever first
    stays within AUTO_MAX_ERROR of `weight`; else `weight` itself (float). Returns the chosen
    weight and its relative error. `head`: the LM head, int8 without a bfloat16 copy."""
    if groups is not None and not head and int4_supported(weight.shape):
        q4 = Int4Weight(groups)
        err = relative_error(q4.dequantize(), weight)
        if err <= AUTO_MAX_ERROR:
            return q4, err
    q8 = Int8Weight(weight, keep_wide=not head)
    err = relative_error(q8.dequantize(), weight)
    if err <= AUTO_MAX_ERROR:
        return q8, err
    return weight, 0.0


def int4_supported(shape: tuple[int, ...] | torch.Size) -> bool:
    """Whether torch's CPU int4 kernel takes an [out, in] matrix of this shape."""
    return (hasattr(torch, "_weight_int4pack_mm_for_cpu") and len(shape) == 2
            and shape[1] % (2 * INT4_GROUP) == 0 and shape[0] % 16 == 0)


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight,
           bias: torch.Tensor | None = None, deterministic: bool = False) -> torch.Tensor:
    """F.linear over any weight format. `deterministic`: each row's result depends on that row
    alone, whatever the other rows and their number (`fixed_rows`)."""
    if deterministic:
        y = fixed_rows(x, weight)
        return y if bias is None else y + bias
    if isinstance(weight, QuantizedWeight):
        y = weight(x)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def fixed_rows(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    """x @ weight.T with row-independent results (deterministic mode). GEMM libraries pick
    kernels and blocking by the number of rows, so a row's rounding depends on how many rows
    share the call. Quantized matrices always take their int8/int4 kernel, which runs each row
    on its own (a GEMV per row: decode as fast as by default, prefill ~4x slower than the
    bfloat16 GEMM); float matrices run in calls of exactly DETERMINISTIC_ROWS rows
    (zero-padded), over which a GEMM treats each row alike. Both checked bit for bit in
    tests/unit/test_llm_deterministic.py."""
    if isinstance(weight, QuantizedWeight):
        return weight._narrow(x.to(torch.bfloat16)).to(x.dtype)
    w, xw = weight, x.to(weight.dtype)
    n, c = xw.shape[0], DETERMINISTIC_ROWS
    pad = -n % c
    if pad:
        xw = torch.cat([xw, xw.new_zeros(pad, xw.shape[1])])
    y = torch.cat([F.linear(xw[i:i + c], w) for i in range(0, n + pad, c)])   # [n + pad, O]
    return y[:n].to(x.dtype)


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX). Elsewhere oneDNN
    emulates it and int8 weights would run slower than float32."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def int8_available() -> bool:
    return hasattr(torch, "_weight_int8pack_mm")


def resolve_weight_format(requested: str, device: str | torch.device) -> str:
    """'auto' stays 'auto' (per matrix, see pick_auto) on a CPU with fast bfloat16 and is
    'float' elsewhere. int8/int4 are CPU formats: GPUs keep bfloat16 weights, which their
    tensor cores read at full bandwidth."""
    if requested not in WEIGHT_FORMATS:
        raise ValueError(f"weight format must be one of {WEIGHT_FORMATS}, got {requested!r}")
    on_cpu = torch.device(device).type == "cpu"
    if requested == "auto":
        return "auto" if on_cpu and int4_available() and cpu_has_fast_bf16() else "float"
    if requested == "int8" and not (on_cpu and int8_available()):
        raise ValueError("int8 weights need a CPU engine and torch._weight_int8pack_mm")
    if requested == "int4" and not (on_cpu and int4_available()):
        raise ValueError("int4 weights need a CPU engine and torch._weight_int4pack_mm_for_cpu")
    return requested


def int4_available() -> bool:
    return int8_available() and hasattr(torch, "_weight_int4pack_mm_for_cpu")


@dataclass(slots=True)
class BlockWeight:
    """A loaded matrix: its float values (what the file's blocks dequantize to) and, when the
    file stores it as affine 4-bit groups, those groups, so int4 weights keep them."""

    dense: torch.Tensor       # [O, I] float32
    groups: Int4Groups
