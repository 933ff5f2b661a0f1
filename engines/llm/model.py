"""The Llama-family decoder over a paged KV cache.

One forward call serves a whole scheduler step: the new tokens of every sequence (prefill chunks
and single decode tokens alike) run through each layer together as one [T, E] matrix, so every
weight is read once per step whatever the batch. Only attention is per sequence
(engines.llm.attention).

Weights follow Hugging Face's layout (the GGUF loader un-permutes llama.cpp's Q/K rows), so RoPE is
the rotate-half form. Q/K/V and gate/up are fused into one matrix each: fewer, larger matmuls.
The architecture variants (engines.llm.config.LlamaConfig's fields: Q/K norms, post and sandwich
norms, GeGLU, scaled embeddings/residuals/logits, soft-capping, NoPE, local-rotary and
sliding-window layers) are branches of this one block.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator, cast

import torch
import torch.nn.functional as F
from torch import nn

from engines.llm.attention import paged_attention, row_attention
from engines.llm.config import LlamaConfig, ModelLoadFailed
from engines.llm.kv_cache import AttentionMetadata, PagedKVCache
from engines.llm.quant import (BlockWeight, Int4Groups, Int4Weight, Int8Weight, QuantizedWeight,
                               int4_supported, linear, pick_auto, resolve_weight_format)

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


_MATRICES = ("qkv", "o_proj", "gate_up", "down")
_NORMS = ("attn_norm", "ffn_norm", "post_attn_norm", "post_ffn_norm", "q_norm", "k_norm")
# The loader tensors each fused matrix is made of, in row order.
_PARTS = {"qkv": ("q", "k", "v"), "o_proj": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}


class DecoderLayer(nn.Module):
    qkv: torch.Tensor | Int8Weight | Int4Weight
    o_proj: torch.Tensor | Int8Weight | Int4Weight
    gate_up: torch.Tensor | Int8Weight | Int4Weight
    down: torch.Tensor | Int8Weight | Int4Weight

    def __init__(self, cfg: LlamaConfig, index: int, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg, self.index = cfg, index
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim ** -0.5
        self.window = cfg.sliding_window if index in cfg.window_layers else None
        e, qkv = cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size

        def norm(size: int, present: bool) -> nn.Parameter | None:
            return _param(size, device=device, dtype=dtype) if present else None
        pre, post = cfg.norm_layout != "post", cfg.norm_layout != "pre"
        self.attn_norm, self.ffn_norm = norm(e, pre), norm(e, pre)
        self.post_attn_norm, self.post_ffn_norm = norm(e, post), norm(e, post)
        full = cfg.qk_norm == "full"
        self.q_norm = norm(cfg.q_size if full else cfg.head_dim, cfg.qk_norm != "none")
        self.k_norm = norm(cfg.kv_size if full else cfg.head_dim, cfg.qk_norm != "none")
        self.qkv = _param(qkv, e, device=device, dtype=dtype)
        self.qkv_bias = _param(qkv, device=device, dtype=dtype) if cfg.attn_bias else None
        self.o_proj = _param(e, cfg.q_size, device=device, dtype=dtype)
        self.gate_up = _param(2 * cfg.intermediate_size, e, device=device, dtype=dtype)
        self.down = _param(e, cfg.intermediate_size, device=device, dtype=dtype)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        return x if weight is None else rms_norm(x, weight, self.cfg.rms_eps)

    def _residual(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        scale = self.cfg.residual_scale
        return h + (out if scale == 1.0 else out * scale)

    def _qk(self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Q [T, H, D] and K [T, KV, D] from the fused projection, normed and rotated."""
        cfg, t = self.cfg, qkv.shape[0]
        n_q, n_kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if cfg.qk_norm == "none":
            # Q and K heads rotate together: one RoPE over [T, H + KV, D].
            qk = qkv[:, :cfg.q_size + cfg.kv_size].view(t, n_q + n_kv, d)
            if rope is not None:
                qk = apply_rope(qk, *rope)
            return qk[:, :n_q], qk[:, n_q:]
        q, k = qkv[:, :cfg.q_size], qkv[:, cfg.q_size:cfg.q_size + cfg.kv_size]
        if cfg.qk_norm == "full":                    # OLMo 2: over the whole projection
            q, k = self._norm(q, self.q_norm), self._norm(k, self.k_norm)
        q, k = q.reshape(t, n_q, d), k.reshape(t, n_kv, d)
        if cfg.qk_norm == "head":                    # Qwen3, Gemma 3: over each head
            q, k = self._norm(q, self.q_norm), self._norm(k, self.k_norm)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                kv: PagedKVCache, meta: AttentionMetadata,
                det: list[tuple[int, int, int, torch.Tensor]] | None = None) -> torch.Tensor:
        """`rope`: this layer's (cos, sin), None for a NoPE layer; `meta`: the step's attention
        metadata, windowed for a sliding-window layer; `det`: deterministic mode's per-sequence
        rows (see row_attention), else None."""
        cfg, t = self.cfg, h.shape[0]
        fixed = det is not None
        qkv = linear(self._norm(h, self.attn_norm), self.qkv, self.qkv_bias, fixed)
        q, k = self._qk(qkv, rope)
        v = qkv[:, cfg.q_size + cfg.kv_size:].view(t, cfg.num_kv_heads, cfg.head_dim)
        kv.write(self.index, k, v, meta.slots)
        softcap = cfg.attn_softcap
        attn = (row_attention(q, kv, self.index, det, self.scale, softcap, self.window)
                if det is not None else
                paged_attention(q, k, v, kv, self.index, meta, self.scale, softcap))
        h = self._residual(h, self._norm(linear(attn, self.o_proj, deterministic=fixed),
                                         self.post_attn_norm))
        gate, up = linear(self._norm(h, self.ffn_norm), self.gate_up,
                          deterministic=fixed).chunk(2, dim=-1)
        act = F.silu(gate) if cfg.activation == "silu" else F.gelu(gate, approximate="tanh")
        return self._residual(h, self._norm(linear(act * up, self.down, deterministic=fixed),
                                            self.post_ffn_norm))

    def quantize(self, fmt: str, groups: dict[str, Int4Groups]) -> dict[str, str]:
        """Every matrix to `fmt`: "int8", "int4" (a shape the int4 kernel cannot take stays
        int8) or "auto" (engines.llm.quant.pick_auto). `groups`: the file's own 4-bit groups by
        loader name; a fused matrix uses them when all its parts have them. Returns each
        matrix's format."""
        chosen = {}
        for name in _MATRICES:
            w = getattr(self, name)
            parts = [groups.get(f"layers.{self.index}.{p}") for p in _PARTS[name]]
            own = Int4Groups.cat(cast("list[Int4Groups]", parts)) if all(parts) else None
            weight: torch.Tensor | Int8Weight | Int4Weight
            if fmt == "auto":
                weight, _ = pick_auto(w, own)
            elif fmt == "int4" and int4_supported(w.shape):
                weight = Int4Weight(own if own is not None else w)
            else:
                weight = Int8Weight(w)
            chosen[name] = _format_name(weight)
            if weight is not w:
                delattr(self, name)             # drop the float32 Parameter before replacing it
                setattr(self, name, weight)
        return chosen


def _format_name(weight: torch.Tensor | QuantizedWeight) -> str:
    return ("int4" if isinstance(weight, Int4Weight) else "int8"
            if isinstance(weight, Int8Weight) else "float")


class LlamaModel(nn.Module):
    inv_freq: torch.Tensor
    local_inv_freq: torch.Tensor
    embed: torch.Tensor | Int8Weight
    lm_head: torch.Tensor | Int8Weight

    def __init__(self, cfg: LlamaConfig, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        self.dtype = dtype
        self.weight_format = "float"          # after quantize(): the layer matrices' formats
        self.requested_format = "float"
        self.formats: dict[str, str] = {}     # matrix -> format, after quantize()
        self._int4_groups: dict[str, Int4Groups] = {}   # the file's 4-bit groups, until quantize()
        self.embed = _param(cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, device, dtype)
                                    for i in range(cfg.num_layers))
        self.norm = _param(cfg.hidden_size, device=device, dtype=dtype)
        self.lm_head = (self.embed if cfg.tie_embeddings else
                        _param(cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype))
        self.register_buffer("inv_freq", rope_inv_freq(cfg).to(device), persistent=False)
        # Gemma 3's local layers: their own base, no scaling
        local = (replace(cfg, rope_theta=cfg.local_rope_theta, rope_freq_factors=None)
                 if cfg.local_rope_theta is not None else cfg)
        self.register_buffer("local_inv_freq", rope_inv_freq(local).to(device), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.norm.device

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: PagedKVCache,
                deterministic: bool = False) -> torch.Tensor:
        """Writes the new tokens' K/V into their slots (block_tables[i][pos // bs], pos % bs),
        attends causally over each sequence's whole context read from the paged cache, and returns
        logits [num_seqs, vocab] (float32) at each sequence's LAST new token.

        `deterministic`: every row is computed by the same kernels, alone, whatever the batch:
        row-independent products (quant.fixed_rows), attention per row (row_attention).
        A token's K/V and logits then depend only on the tokens before it, not on batch company,
        chunking or prefix-cache hits. Slower: see benchmarks/RESULTS.md."""
        positions = batch.positions.to(self.device, non_blocking=True)  # no-op when already there
        meta = AttentionMetadata.build(positions, batch.query_lens, batch.context_lens,
                                       batch.block_tables, kv.block_size)
        det = self._row_groups(batch, kv.block_size) if deterministic else None
        cfg = self.cfg
        h = self._embed(batch.token_ids.to(self.device, non_blocking=True))   # [T, E]
        if cfg.embed_scale != 1.0:
            h = h * torch.tensor(cfg.embed_scale, dtype=h.dtype)
        rope: tuple[torch.Tensor, torch.Tensor] | None = rope_cos_sin(positions, self.inv_freq,
                                                                      self.dtype)
        local = (rope_cos_sin(positions, self.local_inv_freq, self.dtype)
                 if cfg.local_layers and cfg.local_rope_theta is not None else rope)
        windowed = (meta.windowed(cfg.sliding_window, kv.block_size) if cfg.sliding_window
                    else meta)
        for i, layer in enumerate(self.layers):
            layer_rope = (None if i in cfg.nope_layers else local if i in cfg.local_layers
                          else rope)
            h = layer(h, layer_rope, kv, windowed if i in cfg.window_layers else meta, det)
        last = rms_norm(h[meta.last_rows], self.norm, cfg.rms_eps)      # [B, E]
        logits = self._lm_head(last, deterministic).float()             # [B, V]
        if cfg.logit_scale != 1.0:
            logits = logits * cfg.logit_scale
        if cfg.final_softcap is not None:
            logits = torch.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        return logits

    def _row_groups(self, batch: ForwardBatch, block_size: int
                    ) -> list[tuple[int, int, int, torch.Tensor]]:
        groups, start = [], 0
        for n, ctx, table in zip(batch.query_lens, batch.context_lens, batch.block_tables):
            blocks = torch.tensor(table[:-(-ctx // block_size)], dtype=torch.int64,
                                  device=self.device)
            groups.append((start, n, ctx, blocks))
            start += n
        return groups

    def _embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.embed, Int8Weight):
            return self.embed.rows(token_ids).to(self.dtype)
        return F.embedding(token_ids, self.embed)

    def _lm_head(self, x: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        if deterministic:
            return linear(x, self.lm_head, deterministic=True)
        if isinstance(self.lm_head, Int8Weight):
            return self.lm_head(x)
        if x.device.type == "cpu" and x.dtype == torch.float32 and 1 < x.shape[0] <= 8:
            # With 2-8 rows MKL's fp32 GEMM repacks the whole [V, E] weight and runs 2-3x
            # slower than the transposed product, which streams the weight once.
            return torch.mm(self.lm_head, x.t()).t()
        return F.linear(x, self.lm_head)

    def quantize(self, fmt: str = "int8") -> None:
        """Turn the layer matrices into Int8Weight / Int4Weight (engines.llm.quant), after
        loading: all of them for "int8" and "int4", each as pick_auto decides for "auto". The
        LM head is int8 (under "auto": if within its bound) and keeps no bfloat16 copy: it only
        ever sees one row per sequence. A tied embedding table is read back from the quantized
        head, so it is stored once."""
        if fmt not in ("int8", "int4", "auto"):
            raise ValueError(f"quantize to int8, int4 or auto, not {fmt!r}")
        if self.requested_format != "float":
            if self.requested_format == fmt:
                return
            raise ValueError(f"the model is already {self.weight_format}")
        if self.device.type != "cpu" or self.dtype != torch.float32:
            raise ValueError("int8/int4 weights are for float32 CPU models")
        formats = {}
        for layer in cast("list[DecoderLayer]", list(self.layers)):
            for name, chosen in layer.quantize(fmt, self._int4_groups).items():
                formats[f"layers.{layer.index}.{name}"] = chosen
        self._int4_groups = {}
        weight = cast(torch.Tensor, self.lm_head)
        head: torch.Tensor | Int8Weight = (pick_auto(weight, None, head=True)[0]
                                           if fmt == "auto" else
                                           Int8Weight(weight, keep_wide=False))
        formats["lm_head"] = _format_name(head)
        if head is not weight:
            tied = self.lm_head is self.embed
            del self.lm_head
            self.lm_head = head
            if tied:
                del self.embed
                self.embed = head
        self.formats = formats
        self.requested_format = fmt
        # explicit formats keep their name (a shape int4 cannot take is int8 in both); auto
        # names what it chose for the layer matrices, e.g. "int4+int8"
        self.weight_format = fmt if fmt != "auto" else "+".join(
            sorted({f for k, f in formats.items() if k != "lm_head"}))

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
        if self.requested_format != "float":
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
            for norm in _NORMS:
                weight = getattr(layer, norm)
                if weight is not None:
                    targets[p + norm] = weight.data
            targets.update({
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
    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor | BlockWeight]],
                     source: str) -> None:
        """Fill every parameter from (name, tensor) pairs; ModelLoadFailed on a gap or misfit.
        A BlockWeight's 4-bit groups are kept for quantize()."""
        targets = self.weight_targets()
        missing = set(targets)
        for name, value in self._split_fused(tensors):
            tensor = value.dense if isinstance(value, BlockWeight) else value
            if isinstance(value, BlockWeight) and name.startswith("layers."):
                self._int4_groups[name] = value.groups
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


    def _split_fused(self, tensors: Iterable[tuple[str, torch.Tensor | BlockWeight]]
                     ) -> Iterator[tuple[str, torch.Tensor | BlockWeight]]:
        """Checkpoints that store Q/K/V or gate/up as one matrix (Phi-3: `qkv`, `gate_up`) are
        cut into their parts by rows, 4-bit groups included."""
        cfg = self.cfg
        sizes = {"qkv": (("q", cfg.q_size), ("k", cfg.kv_size), ("v", cfg.kv_size)),
                 "gate_up": (("gate", cfg.intermediate_size), ("up", cfg.intermediate_size))}
        for name, value in tensors:
            prefix, _, kind = name.rpartition(".")
            if kind not in sizes or not prefix.startswith("layers."):
                yield name, value
                continue
            dense = value.dense if isinstance(value, BlockWeight) else value
            total = sum(n for _, n in sizes[kind])
            if dense.shape[0] != total:
                raise ModelLoadFailed(f"{name} has {dense.shape[0]} rows, the config implies "
                                      f"{total}")
            start = 0
            for part, n in sizes[kind]:
                rows = slice(start, start + n)
                start += n
                yield f"{prefix}.{part}", (BlockWeight(dense[rows], value.groups.rows(rows))
                                           if isinstance(value, BlockWeight) else dense[rows])


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
    fmt = resolve_weight_format(weights, device)
    if fmt in ("int8", "int4", "auto") and dtype == torch.float32:
        model.quantize(fmt)
    elif fmt != "float" and weights != "auto":
        raise ModelLoadFailed(f"{weights} weights need dtype float32 on a CPU, not {dtype} on "
                              f"{device}")
    counts = {f: list(model.formats.values()).count(f) for f in set(model.formats.values())}
    log.info("loaded %s (%s, %d layers, %s, %s weights %s, %.0f MB, on %s) in %.2f s", path.name,
             cfg.arch, cfg.num_layers, dtype, model.weight_format, counts or "",
             model.weight_bytes() / 2**20, device, time.monotonic() - started)
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
