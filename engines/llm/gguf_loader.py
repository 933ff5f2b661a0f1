"""Reading a Llama-family model from a GGUF file (llama.cpp's format).

The header and tensor directory are parsed here, over a read-only memory map: gguf.GGUFReader
builds a numpy view for every one of the ~100k vocabulary strings and takes seconds, where a
struct walk takes tens of milliseconds (the frontends read the vocabulary too). Every read is
bounds-checked, so a damaged file is a clear ModelLoadFailed. Tensors are dequantized with the
`gguf` package (Q4_0, Q4_1, Q8_0, F16, BF16, F32 and the K-quants it implements) and handed over
in Hugging Face's layout, Q4_0/Q4_1/Q4_K matrices with their own 4-bit groups beside the float
values (`int4_groups`, so int4 weights keep the file's values). llama.cpp's converter permutes
the rows of Llama's Q and K weights so that rotary pairs are adjacent (GPT-J style); we undo
that, so the model runs the same rotate-half RoPE as the HF reference (which architectures were
permuted: engines.llm.architectures).
"""
from __future__ import annotations

import logging
import math
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from engines.llm.architectures import ARCHITECTURES, Architecture
from engines.llm.config import SUPPORTED_ARCHITECTURES, LlamaConfig, ModelLoadFailed, check_gguf

if TYPE_CHECKING:      # torch is imported where tensors are made: the HTTP workers read only
    import torch      # the tokenizer from GGUF files and need not pay ~1.5 s and ~200 MB for it

    from engines.llm.quant import BlockWeight

__all__ = ["GGUFFile", "GGUFTensor", "int4_groups", "read_gguf", "open_gguf"]

log = logging.getLogger(__name__)

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# llama.cpp names -> the loader names LlamaModel.weight_targets() expects.
_GLOBAL_NAMES = {"token_embd.weight": "embed", "output_norm.weight": "norm",
                 "output.weight": "lm_head"}
_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm", "ffn_norm.weight": "ffn_norm",
    "attn_q.weight": "q", "attn_k.weight": "k", "attn_v.weight": "v",
    "attn_q.bias": "q_bias", "attn_k.bias": "k_bias", "attn_v.bias": "v_bias",
    "attn_output.weight": "o", "ffn_gate.weight": "gate", "ffn_up.weight": "up",
    "ffn_down.weight": "down", "attn_q_norm.weight": "q_norm", "attn_k_norm.weight": "k_norm",
    "post_attention_norm.weight": "post_attn_norm", "post_ffw_norm.weight": "post_ffn_norm",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")


class _Truncated(Exception):
    pass


class _Cursor:
    """Little-endian reads from a buffer that fail cleanly past its end."""

    def __init__(self, buf: Any) -> None:
        self.buf, self.pos, self.end = buf, 0, len(buf)

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > self.end:
            raise _Truncated
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > self.end:
            raise _Truncated
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos]).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.unpack("<I"), self.unpack("<Q")
            if item in _SCALARS:        # numeric arrays in one numpy call
                dtype = np.dtype(_SCALARS[item][1:]).newbyteorder("<")
                if self.pos + count * dtype.itemsize > self.end:
                    raise _Truncated
                values = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
                self.pos += count * dtype.itemsize
                return values
            if count > self.end - self.pos:     # each item takes at least a byte
                raise _Truncated
            return [self.value(item) for _ in range(count)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown metadata value type {kind}")
        return self.unpack(_SCALARS[kind])


@dataclass(slots=True, frozen=True)
class GGUFTensor:
    name: str
    dims: tuple[int, ...]           # GGML order: dims[0] is the contiguous (input) dimension
    qtype: int                      # gguf.GGMLQuantizationType value
    offset: int                     # bytes from the start of the file
    nbytes: int


@dataclass(slots=True)
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    buf: Any                        # read-only memory map of the whole file

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def raw(self, tensor: GGUFTensor) -> np.ndarray:
        """The tensor's bytes as uint8 [rows, bytes per row], the form gguf dequantizes."""
        data = np.frombuffer(self.buf, np.uint8, tensor.nbytes, tensor.offset)
        rows = int(np.prod(tensor.dims[1:])) if len(tensor.dims) > 1 else 1
        return data.reshape(rows, -1)


def _tensor_infos(cur: _Cursor, count: int, file_size: int, alignment: int) -> dict[str, GGUFTensor]:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    infos = []
    for _ in range(count):
        name = cur.string()
        dims = tuple(cur.unpack("<Q") for _ in range(cur.unpack("<I")))
        qtype, offset = cur.unpack("<I"), cur.unpack("<Q")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (ValueError, KeyError) as exc:
            raise ValueError(f"tensor {name} has unknown type {qtype}") from exc
        if not dims or dims[0] % block:
            raise ValueError(f"tensor {name} has shape {dims} that its type cannot hold")
        infos.append((name, dims, qtype, offset, int(np.prod(dims)) // block * type_size))
    data_start = -(-cur.pos // alignment) * alignment
    tensors = {}
    for name, dims, qtype, offset, nbytes in infos:
        if data_start + offset + nbytes > file_size:
            raise _Truncated
        tensors[name] = GGUFTensor(name, dims, qtype, data_start + offset, nbytes)
    return tensors


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's metadata and tensor directory; ModelLoadFailed when it is missing,
    not GGUF, or damaged."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadFailed(f"model weights not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadFailed(f"{path} is not a GGUF file (no GGUF magic bytes)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _Cursor(memoryview(buf))
    cur.pos = 4
    try:
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are; "
                             f"big-endian files are not)")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        metadata = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.unpack("<I"))
        alignment = metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment={alignment!r} is not a power of two")
        tensors = _tensor_infos(cur, n_tensors, len(buf), alignment)
    except _Truncated:
        raise ModelLoadFailed(f"{path}: unreadable GGUF file: truncated") from None
    except (ValueError, OverflowError) as exc:
        raise ModelLoadFailed(f"{path}: unreadable GGUF file: {exc}") from exc
    return GGUFFile(path, metadata, tensors, buf)


def _config(gf: GGUFFile) -> LlamaConfig:
    arch, path = gf.get("general.architecture"), gf.path
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadFailed(f"{path}: unsupported architecture {arch!r}; this engine runs "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}")

    def meta(key: str, default: Any = None) -> Any:
        return gf.get(f"{arch}.{key}", default)

    hidden, heads = meta("embedding_length"), meta("attention.head_count")
    if hidden is None or heads is None or meta("block_count") is None:
        raise ModelLoadFailed(f"{path}: GGUF metadata lacks {arch}.embedding_length, "
                              f"block_count or attention.head_count")
    head_dim = meta("attention.key_length", hidden // heads)
    if meta("rope.dimension_count", head_dim) != head_dim:
        raise ModelLoadFailed(f"{path}: partial rotary embeddings are not supported")
    embed = gf.tensors.get("token_embd.weight")
    vocab = (meta("vocab_size") or len(gf.get("tokenizer.ggml.tokens", ()))
             or (embed.dims[-1] if embed else 0))
    eos = [gf.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    shared = dict(
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=meta("feed_forward_length", 0), num_layers=meta("block_count"),
        num_heads=heads, num_kv_heads=meta("attention.head_count_kv", heads), head_dim=head_dim,
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        rms_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        max_context=meta("context_length", 4096),
        tie_embeddings="output.weight" not in gf.tensors,
        bos_id=gf.get("tokenizer.ggml.bos_token_id"),
        eos_ids=tuple(dict.fromkeys(e for e in eos if e is not None)),
        arch=arch, attn_bias="blk.0.attn_q.bias" in gf.tensors,
        rope_freq_factors=_rope_factors(gf, meta, head_dim),
        weight_bits=_layer_weight_bits(gf),
    )
    extra = ARCHITECTURES[arch].gguf_fields(meta, shared, set(gf.tensors))
    return LlamaConfig(**{**shared, **extra}).validate()


def _layer_weight_bits(gf: GGUFFile) -> int:
    """Bits per weight of the widest layer matrix, rounded up (block scales included)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    widest = 0.0
    for tensor in gf.tensors.values():
        if tensor.name.startswith("blk.") and len(tensor.dims) == 2:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(tensor.qtype)]
            widest = max(widest, type_size * 8 / block)
    return math.ceil(widest) if widest else 32


def _rope_factors(gf: GGUFFile, meta: Any, head_dim: int) -> tuple[float, ...] | None:
    scaling = meta("rope.scaling.type", "none")
    if scaling == "linear":
        return (float(meta("rope.scaling.factor", 1.0)),) * (head_dim // 2)
    if scaling not in ("none", None):
        raise ModelLoadFailed(f"{gf.path}: rope scaling {scaling!r} is not supported")
    # Llama 3.1 stores its per-frequency divisors as a tensor.
    freqs = gf.tensors.get("rope_freqs.weight")
    if freqs is None:
        return None
    return tuple(float(x) for x in _dequantize(gf, freqs).reshape(-1))


_DEQUANT_SLICE = 1 << 22         # values dequantized at once: bounded float32 temporaries


def _dequantize(gf: GGUFFile, tensor: GGUFTensor) -> np.ndarray:
    """The tensor as float32 [out, in], bit for bit what gguf's `quants.dequantize` gives.

    gguf applies its (vectorised) block decoder to 16 rows at a time, which for a model's
    narrow rows costs more in slicing than in arithmetic (2 of SmolLM2's 3 s of loading). The
    same decoder over slices of ~4M values does the same element-wise operations."""
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType(tensor.qtype)
    raw = gf.raw(tensor)
    codec: Any = getattr(quants, qtype.name, None)
    try:
        if not (isinstance(codec, type) and hasattr(codec, "dequantize_rows")):
            w = quants.dequantize(raw, qtype)       # F32, F16 (views), or NotImplementedError
        else:
            codec.init_grid()                       # the IQ types' lookup tables
            w = np.empty((raw.shape[0], tensor.dims[0]), np.float32)
            step = max(1, _DEQUANT_SLICE // max(1, w.shape[1]))
            for start in range(0, raw.shape[0], step):
                part = raw[start:start + step]
                w[start:start + step] = codec.dequantize_rows(part).reshape(part.shape[0], -1)
    except NotImplementedError as exc:
        raise ModelLoadFailed(f"{gf.path}: tensor {tensor.name} uses {qtype.name}, "
                              f"which cannot be dequantized") from exc
    return w.reshape(tuple(reversed(tensor.dims)))          # [out, in]


_Q4_0, _Q4_1, _Q4_K = 2, 3, 12          # gguf.GGMLQuantizationType values


def int4_groups(gf: GGUFFile, tensor: GGUFTensor) -> tuple[np.ndarray, ...] | None:
    """A 2-D Q4_0, Q4_1 or Q4_K tensor as groups of 32 in the int4 kernel's form,
    w = (q - 8) * scale + zero: (q uint8 [out, in], scale, zero float32 [out, in / 32]);
    None for other types."""
    if len(tensor.dims) != 2 or tensor.qtype not in (_Q4_0, _Q4_1, _Q4_K):
        return None
    out = tensor.dims[1]
    raw = gf.raw(tensor)                                               # [out, bytes per row]

    def f16(b: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(b).view(np.float16).astype(np.float32)[..., 0]

    def nibbles(qs: np.ndarray) -> np.ndarray:       # [..., n] bytes -> [..., 2n] values
        return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)

    if tensor.qtype in (_Q4_0, _Q4_1):
        head = 2 if tensor.qtype == _Q4_0 else 4
        blocks = raw.reshape(out, -1, head + 16)                       # [O, I/32, bytes]
        d = f16(blocks[..., 0:2])
        q = nibbles(blocks[..., head:])                                # [O, I/32, 32]
        zero = np.zeros_like(d) if tensor.qtype == _Q4_0 else f16(blocks[..., 2:4]) + 8 * d
        return q.reshape(out, -1), d, zero
    from gguf.quants import Q4_K

    blocks = raw.reshape(-1, 144)                                      # [O * I/256, bytes]
    d, dmin = f16(blocks[:, 0:2])[:, None], f16(blocks[:, 2:4])[:, None]
    sc, mn = Q4_K.get_scale_min(blocks[:, 4:16])                       # [N, 8] 6-bit each
    # 128 bytes: four runs of 32; low nibbles are sub-block 2j, high nibbles 2j + 1.
    q = nibbles(blocks[:, 16:].reshape(-1, 4, 32))                     # [N, 4, 64]
    scale = d * sc.astype(np.float32)                                  # [N, 8]
    zero = 8 * scale - dmin * mn.astype(np.float32)
    return q.reshape(out, -1), scale.reshape(out, -1), zero.reshape(out, -1)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: per head, (D/2, 2) row pairs -> (2, D/2) halves."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _loader_name(gguf_name: str, spec: Architecture) -> str | None:
    match = _LAYER_RE.fullmatch(gguf_name)
    if match:
        name = spec.gguf_layer_names.get(match.group(2)) or _LAYER_NAMES.get(match.group(2))
        return f"layers.{match.group(1)}.{name}" if name else None
    return _GLOBAL_NAMES.get(gguf_name)


def _tensors(gf: GGUFFile, cfg: LlamaConfig
             ) -> Iterator[tuple[str, torch.Tensor | BlockWeight]]:
    import torch

    from engines.llm.quant import BlockWeight, Int4Groups

    spec = ARCHITECTURES[cfg.arch]
    permuted = spec.gguf_permuted
    for tensor in gf.tensors.values():
        if tensor.name == "rope_freqs.weight":
            continue                                    # folded into cfg.rope_freq_factors
        name = _loader_name(tensor.name, spec)
        if name is None:
            raise ModelLoadFailed(f"{gf.path}: unexpected tensor {tensor.name!r} for a "
                                  f"{cfg.arch} model")
        w = _dequantize(gf, tensor)
        groups = int4_groups(gf, tensor)
        heads = (cfg.num_heads if name.endswith((".q", ".q_bias")) else cfg.num_kv_heads
                 if name.endswith((".k", ".k_bias")) else 0)
        if permuted and heads:
            w = _unpermute(w, heads)
            groups = groups and tuple(_unpermute(g, heads) for g in groups)
        # Copy when the array still views the (read-only) file mapping, as F32 tensors do.
        dense = torch.from_numpy(w if w.flags.writeable else w.copy())
        if groups is None:
            yield name, dense
        else:
            q, scale, zero = (torch.from_numpy(np.ascontiguousarray(g)) for g in groups)
            yield name, BlockWeight(dense, Int4Groups(q, scale, zero))


def open_gguf(path: str | Path
              ) -> tuple[LlamaConfig, Iterator[tuple[str, torch.Tensor | BlockWeight]]]:
    """The model config and a lazy stream of dequantized float32 tensors in HF layout."""
    gf = read_gguf(path)
    cfg = _config(gf)
    # fields it would ignore, tokenizer, stop tokens
    cfg = check_gguf(gf, cfg, ARCHITECTURES[cfg.arch].gguf_runs)
    return cfg, _tensors(gf, cfg)
