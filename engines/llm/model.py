"""The Llama-family decoder over a paged KV cache.

One forward call serves a whole scheduler step: the new tokens of every sequence (prefill chunks
and single decode tokens alike) run through each layer together as one [T, E] matrix, so every
weight is read once per step whatever the batch. Only attention is per sequence: decode-only
sequences attend together over one padded gather of their blocks; prefill chunks attend one by one.

Weights follow Hugging Face's layout (the GGUF loader un-permutes llama.cpp's Q/K rows), so RoPE is
the rotate-half form. Q/K/V and gate/up are fused into one matrix each: fewer, larger matmuls.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, cast

import torch
import torch.nn.functional as F
from torch import nn

from engines.llm.config import LlamaConfig, ModelLoadFailed
from engines.llm.kv_cache import AttentionMetadata, DecodeGroup, PagedKVCache, PrefillSeq
from engines.llm.quant import (Int4Weight, Int8Weight, QuantizedWeight, int4_supported,
                               linear, resolve_weight_format)

__all__ = ["ForwardBatch", "LlamaModel", "load_model", "random_model"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ForwardBatch:
    token_ids: torch.Tensor        # [T] int64, the NEW tokens of every sequence, concatenated in seq order
    positions: torch.Tensor        # [T] int64, absolute position of each new token
    query_lens: list[int]          # new tokens per sequence (sum == T)
    context_lens: list[int]        # total tokens per sequence after this step (cached + new)
    block_tables: list[list[int]]  # block ids of each sequence, in order, covering context_lens


def _param(*shape: int, device: torch.device | str, dtype: torch.dtype) -> nn.Parameter:
    # torch.empty: the loader overwrites every value, so initialising would only cost load time.
    return nn.Parameter(torch.empty(shape, device=device, dtype=dtype), requires_grad=False)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 and scale after casting back, as the reference (HF Llama) does.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    exponent = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** exponent)                      # [D/2]
    if cfg.rope_freq_factors is not None:
        inv_freq = inv_freq / torch.tensor(cfg.rope_freq_factors, dtype=torch.float32)
    return inv_freq


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions[:, None].float() * inv_freq[None, :]             # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]                # [T, 1, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)                                        # x: [T, N, D]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _decode_attention(q: torch.Tensor, kv: PagedKVCache, layer: int, group: DecodeGroup,
                      scale: float) -> torch.Tensor:
    b, h, d = q.shape                                                  # [B, H, D]
    k, v = kv.gather(layer, group.block_table)                         # [B, L, KV, D]
    n_kv = k.shape[2]
    # GQA without copying K/V: the G query heads sharing a KV head become G query rows.
    q = q.view(b, n_kv, h // n_kv, d)                                  # [B, KV, G, D]
    k = k.transpose(1, 2).to(q.dtype)                                  # [B, KV, L, D]
    v = v.transpose(1, 2).to(q.dtype)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=group.key_mask, scale=scale)
    return o.reshape(b, h, d)


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: PagedKVCache,
                       layer: int, seq: PrefillSeq, scale: float) -> torch.Tensor:
    if seq.blocks is not None:                  # a cached prefix: read the whole context back
        k, v = kv.gather(layer, seq.blocks)                            # [nb * bs, KV, D]
        k, v = k[:seq.context_len].to(q.dtype), v[:seq.context_len].to(q.dtype)
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=seq.mask, is_causal=seq.mask is None, scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1)                                        # [Q, H, D]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: PagedKVCache,
                    layer: int, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, H, D], the new k/v [T, KV, D] (already written to the cache) -> [T, H * D]."""
    t, h, d = q.shape
    group = meta.decode
    if group is not None and group.rows is None:                       # decode-only step
        return _decode_attention(q, kv, layer, group, scale).reshape(t, h * d)
    out = q.new_empty(t, h, d)
    if group is not None:
        out[group.rows] = _decode_attention(q[group.rows], kv, layer, group, scale)
    for seq in meta.prefills:
        rows = slice(seq.start, seq.start + seq.query_len)
        out[rows] = _prefill_attention(q[rows], k[rows], v[rows], kv, layer, seq, scale)
    return out.view(t, h * d)


_MATRICES = ("qkv", "o_proj", "gate_up", "down")


class DecoderLayer(nn.Module):
    qkv: torch.Tensor | Int8Weight | Int4Weight
    o_proj: torch.Tensor | Int8Weight | Int4Weight
    gate_up: torch.Tensor | Int8Weight | Int4Weight
    down: torch.Tensor | Int8Weight | Int4Weight

    def __init__(self, cfg: LlamaConfig, index: int, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg, self.index = cfg, index
        self.scale = cfg.head_dim ** -0.5
        e, qkv = cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size
        self.attn_norm = _param(e, device=device, dtype=dtype)
        self.qkv = _param(qkv, e, device=device, dtype=dtype)
        self.qkv_bias = _param(qkv, device=device, dtype=dtype) if cfg.attn_bias else None
        self.o_proj = _param(e, cfg.q_size, device=device, dtype=dtype)
        self.ffn_norm = _param(e, device=device, dtype=dtype)
        self.gate_up = _param(2 * cfg.intermediate_size, e, device=device, dtype=dtype)
        self.down = _param(e, cfg.intermediate_size, device=device, dtype=dtype)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: PagedKVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        cfg, t = self.cfg, h.shape[0]
        n_q, n_kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv = linear(rms_norm(h, self.attn_norm, cfg.rms_eps), self.qkv, self.qkv_bias)
        # Q and K heads rotate together: one RoPE over [T, H + KV, D].
        qk = apply_rope(qkv[:, :cfg.q_size + cfg.kv_size].view(t, n_q + n_kv, d), cos, sin)
        q, k = qk[:, :n_q], qk[:, n_q:]
        v = qkv[:, cfg.q_size + cfg.kv_size:].view(t, n_kv, d)
        kv.write(self.index, k, v, meta.slots)
        h = h + linear(paged_attention(q, k, v, kv, self.index, meta, self.scale), self.o_proj)
        gate, up = linear(rms_norm(h, self.ffn_norm, cfg.rms_eps), self.gate_up).chunk(2, dim=-1)
        return h + linear(F.silu(gate) * up, self.down)

    def quantize(self, fmt: str) -> None:
        """Every matrix to `fmt` ("int8" or "int4"; a shape the int4 kernel cannot take stays
        int8)."""
        for name in _MATRICES:
            w = getattr(self, name)
            weight: Int8Weight | Int4Weight = (Int4Weight(w) if fmt == "int4" and
                                               int4_supported(w.shape) else Int8Weight(w))
            delattr(self, name)                 # drop the float32 Parameter before replacing it
            setattr(self, name, weight)


class LlamaModel(nn.Module):
    inv_freq: torch.Tensor
    embed: torch.Tensor | Int8Weight
    lm_head: torch.Tensor | Int8Weight

    def __init__(self, cfg: LlamaConfig, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        self.dtype = dtype
        self.weight_format = "float"
        self.embed = _param(cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, device, dtype)
                                    for i in range(cfg.num_layers))
        self.norm = _param(cfg.hidden_size, device=device, dtype=dtype)
        self.lm_head = (self.embed if cfg.tie_embeddings else
                        _param(cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype))
        self.register_buffer("inv_freq", rope_inv_freq(cfg).to(device), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.norm.device

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: PagedKVCache) -> torch.Tensor:
        """Writes the new tokens' K/V into their slots (block_tables[i][pos // bs], pos % bs),
        attends causally over each sequence's whole context read from the paged cache, and returns
        logits [num_seqs, vocab] (float32) at each sequence's LAST new token."""
        positions = batch.positions.to(self.device, non_blocking=True)  # no-op when already there
        meta = AttentionMetadata.build(positions, batch.query_lens, batch.context_lens,
                                       batch.block_tables, kv.block_size)
        h = self._embed(batch.token_ids.to(self.device, non_blocking=True))   # [T, E]
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, kv, meta)
        last = rms_norm(h[meta.last_rows], self.norm, self.cfg.rms_eps)   # [B, E]
        return self._lm_head(last).float()                              # [B, V]

    def _embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.embed, Int8Weight):
            return self.embed.rows(token_ids).to(self.dtype)
        return F.embedding(token_ids, self.embed)

    def _lm_head(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.lm_head, Int8Weight):
            return self.lm_head(x)
        if x.device.type == "cpu" and x.dtype == torch.float32 and 1 < x.shape[0] <= 8:
            # With 2-8 rows MKL's fp32 GEMM repacks the whole [V, E] weight and runs 2-3x
            # slower than the transposed product, which streams the weight once.
            return torch.mm(self.lm_head, x.t()).t()
        return F.linear(x, self.lm_head)

    def quantize(self, fmt: str = "int8") -> None:
        """Turn every layer matrix into an Int8Weight or Int4Weight (engines.llm.quant), after
        loading. The LM head is int8 either way and keeps no bfloat16 copy: it only ever sees
        one row per sequence. A tied embedding table is read back from the quantized head, so
        it is stored once."""
        if fmt not in ("int8", "int4"):
            raise ValueError(f"quantize to int8 or int4, not {fmt!r}")
        if self.weight_format != "float":
            if self.weight_format == fmt:
                return
            raise ValueError(f"the model is already {self.weight_format}")
        if self.device.type != "cpu" or self.dtype != torch.float32:
            raise ValueError("int8/int4 weights are for float32 CPU models")
        for layer in cast("list[DecoderLayer]", list(self.layers)):
            layer.quantize(fmt)
        head = Int8Weight(cast(torch.Tensor, self.lm_head), keep_wide=False)
        tied = self.lm_head is self.embed
        del self.lm_head
        self.lm_head = head
        if tied:
            del self.embed
            self.embed = head
        self.weight_format = fmt

    def weight_bytes(self) -> int:
        """Bytes of weights held, quantized copies included."""
        seen: set[int] = set()
        total = 0
        for module in self.modules():
            for value in list(module.__dict__.values()) + list(module._parameters.values()):
                if isinstance(value, QuantizedWeight) and id(value) not in seen:
                    seen.add(id(value))
                    total += value.nbytes()
                elif isinstance(value, torch.Tensor) and id(value) not in seen:
                    seen.add(id(value))
                    total += value.numel() * value.element_size()
        return total

    def weight_targets(self) -> dict[str, torch.Tensor]:
        """Loader tensor name -> the view of a fused parameter it fills (HF layout, [out, in])."""
        if self.weight_format != "float":
            raise ValueError("weights are loaded before quantizing")
        cfg = self.cfg
        q, kv, i = cfg.q_size, cfg.kv_size, cfg.intermediate_size
        targets = {"embed": cast(torch.Tensor, self.embed).data, "norm": self.norm.data}
        if not cfg.tie_embeddings:
            targets["lm_head"] = cast(torch.Tensor, self.lm_head).data
        for n, layer in enumerate(cast("list[DecoderLayer]", list(self.layers))):
            p = f"layers.{n}."
            qkv, o_proj, gate_up, down = (cast(torch.Tensor, getattr(layer, m)).data
                                          for m in _MATRICES)   # float until quantize()
            targets.update({
                p + "attn_norm": layer.attn_norm.data, p + "ffn_norm": layer.ffn_norm.data,
                p + "q": qkv[:q], p + "k": qkv[q:q + kv], p + "v": qkv[q + kv:],
                p + "o": o_proj, p + "gate": gate_up[:i], p + "up": gate_up[i:],
                p + "down": down,
            })
            if layer.qkv_bias is not None:
                bias = layer.qkv_bias.data
                targets.update({p + "q_bias": bias[:q], p + "k_bias": bias[q:q + kv],
                                p + "v_bias": bias[q + kv:]})
        return targets

    @torch.no_grad()
    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
        """Fill every parameter from (name, tensor) pairs; ModelLoadFailed on a gap or misfit."""
        targets = self.weight_targets()
        missing = set(targets)
        for name, tensor in tensors:
            target = targets.get(name)
            if target is None:
                raise ModelLoadFailed(f"{source}: unexpected tensor {name!r}")
            if tuple(tensor.shape) != tuple(target.shape):
                raise ModelLoadFailed(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                      f"the config implies {tuple(target.shape)}")
            target.copy_(tensor)
            missing.discard(name)
        if missing:
            raise ModelLoadFailed(f"{source}: missing tensors {sorted(missing)[:5]} "
                                  f"({len(missing)} in all)")


def _default_dtype(device: str) -> torch.dtype:
    # float32 on CPU: logits match the float32 reference to ~1e-4. bfloat16 (ask for it) runs
    # about twice as fast on CPUs with AVX512-BF16 or AMX, but moves logits by ~0.5 and can
    # change greedy output. bfloat16 on GPUs: half the memory traffic with float32's range.
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_model(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
               weights: str = "float") -> LlamaModel:
    """Load a .gguf file, or a directory with config.json + *.safetensors (HF Llama layout).
    `weights`: 'float' keeps `dtype`; 'int8', 'int4' and 'auto' see engines.llm.quant."""
    from engines.llm import gguf_loader, safetensors_loader

    path = Path(path)
    started = time.monotonic()
    if path.suffix == ".safetensors" and path.is_file():
        path = path.parent                      # a weights file names its HF directory
    if path.is_dir():
        cfg, tensors = safetensors_loader.open_safetensors(path)
    elif path.is_file():
        cfg, tensors = gguf_loader.open_gguf(path)
    else:
        raise ModelLoadFailed(f"model weights not found: {path}")
    dtype = dtype or _default_dtype(device)
    model = LlamaModel(cfg, device=device, dtype=dtype).eval()
    model.load_weights(tensors, str(path))
    fmt = resolve_weight_format(weights, device, cfg.weight_bits)
    if fmt in ("int8", "int4") and dtype == torch.float32:
        model.quantize(fmt)
    elif fmt != "float" and weights != "auto":
        raise ModelLoadFailed(f"{weights} weights need dtype float32 on a CPU, not {dtype} on "
                              f"{device}")
    log.info("loaded %s (%s, %d layers, %s, %s weights, %.0f MB, on %s) in %.2f s", path.name,
             cfg.arch, cfg.num_layers, dtype, model.weight_format, model.weight_bytes() / 2**20,
             device, time.monotonic() - started)
    return model


def random_model(cfg: LlamaConfig, seed: int = 0, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> LlamaModel:
    """A model with small random weights, for tests that need real logits without a file."""
    gen = torch.Generator().manual_seed(seed)
    model = LlamaModel(cfg, device=device, dtype=dtype).eval()

    def tensors() -> Iterable[tuple[str, torch.Tensor]]:
        for name, target in model.weight_targets().items():
            if name.endswith("norm"):
                yield name, 1.0 + 0.1 * torch.randn(target.shape, generator=gen)
            else:
                yield name, 0.02 * torch.randn(target.shape, generator=gen) * (
                    50.0 if name == "embed" else 1.0)
    model.load_weights(tensors(), "random_model")
    return model
