"""Attention over the paged KV cache, for one layer of one forward step.

Decode-only sequences attend together over one padded gather of their blocks; prefill chunks
attend one by one (over the new K/V, or the whole context read back when a prefix is cached);
deterministic mode attends row by row. Every path goes through `sdpa`, which adds Gemma 2's
attention-logit soft-capping where a model asks for it. A sliding-window layer gets metadata
whose masks hide the keys behind its window (AttentionMetadata.windowed).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engines.llm.kv_cache import AttentionMetadata, DecodeGroup, PagedKVCache, PrefillSeq

__all__ = ["sdpa", "paged_attention", "row_attention"]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
         mask: torch.Tensor | None = None, causal: bool = False, gqa: bool = False,
         softcap: float | None = None) -> torch.Tensor:
    """scaled_dot_product_attention over q [..., N, Q, D], k/v [..., KV, L, D]; with `softcap`
    (Gemma 2) the scores become cap * tanh(s / cap) before the mask, which SDPA cannot do, so
    that product is written out (softmax in float32, as the reference does)."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              scale=scale, enable_gqa=gqa)
    if gqa and q.shape[-3] != k.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale                  # [..., N, Q, L]
    s = torch.tanh(s / softcap) * softcap
    if causal:                                                         # Q == L here
        mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(s.softmax(-1, dtype=torch.float32).to(q.dtype), v)


def _decode_attention(q: torch.Tensor, kv: PagedKVCache, layer: int, group: DecodeGroup,
                      scale: float, softcap: float | None = None) -> torch.Tensor:
    b, h, d = q.shape                                                  # [B, H, D]
    k, v = kv.gather(layer, group.block_table)                         # [B, L, KV, D]
    n_kv = k.shape[2]
    # GQA without copying K/V: the G query heads sharing a KV head become G query rows.
    q = q.view(b, n_kv, h // n_kv, d)                                  # [B, KV, G, D]
    k = k.transpose(1, 2).to(q.dtype)                                  # [B, KV, L, D]
    v = v.transpose(1, 2).to(q.dtype)
    o = sdpa(q, k, v, mask=group.key_mask, scale=scale, softcap=softcap)
    return o.reshape(b, h, d)


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: PagedKVCache,
                       layer: int, seq: PrefillSeq, scale: float,
                       softcap: float | None = None) -> torch.Tensor:
    if seq.blocks is not None:                  # a cached prefix: read the whole context back
        k, v = kv.gather(layer, seq.blocks)                            # [nb * bs, KV, D]
        k, v = k[:seq.context_len].to(q.dtype), v[:seq.context_len].to(q.dtype)
    o = sdpa(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
             mask=seq.mask, causal=seq.mask is None, scale=scale, gqa=True, softcap=softcap)
    return o[0].transpose(0, 1)                                        # [Q, H, D]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: PagedKVCache,
                    layer: int, meta: AttentionMetadata, scale: float,
                    softcap: float | None = None) -> torch.Tensor:
    """q [T, H, D], the new k/v [T, KV, D] (already written to the cache) -> [T, H * D]."""
    t, h, d = q.shape
    group = meta.decode
    if group is not None and group.rows is None:                       # decode-only step
        return _decode_attention(q, kv, layer, group, scale, softcap).reshape(t, h * d)
    out = q.new_empty(t, h, d)
    if group is not None:
        out[group.rows] = _decode_attention(q[group.rows], kv, layer, group, scale, softcap)
    for seq in meta.prefills:
        rows = slice(seq.start, seq.start + seq.query_len)
        out[rows] = _prefill_attention(q[rows], k[rows], v[rows], kv, layer, seq, scale,
                                       softcap)
    return out.view(t, h * d)


def row_attention(q: torch.Tensor, kv: PagedKVCache, layer: int,
                  seqs: list[tuple[int, int, int, torch.Tensor]], scale: float,
                  softcap: float | None = None, window: int | None = None) -> torch.Tensor:
    """Deterministic mode: each query row attends on its own over exactly the keys at or before
    it (one SDPA call per row, no padding, no other rows): the flash kernel's blocking depends
    on the query count and key length, so a token attended in a prefill chunk and the same token
    attended in a decode step would round differently. q [T, H, D] -> [T, H * D]; `seqs`:
    (first row, query_len, context_len, block ids) per sequence, K/V already written; `window`:
    a sliding-window layer's, whose rows see only their last `window` keys."""
    t, h, d = q.shape
    out = q.new_empty(t, h, d)
    for start, n, ctx, blocks in seqs:
        k, v = kv.gather(layer, blocks)                                # [nb * bs, KV, D]
        n_kv = k.shape[1]
        k, v = k.transpose(0, 1).to(q.dtype), v.transpose(0, 1).to(q.dtype)   # [KV, L, D]
        for j in range(n):
            keys = ctx - n + j + 1
            first = max(0, keys - window) if window is not None else 0
            o = sdpa(q[start + j].view(1, n_kv, h // n_kv, d), k[None, :, first:keys],
                     v[None, :, first:keys], scale=scale, softcap=softcap)   # [1, KV, G, D]
            out[start + j] = o.reshape(h, d)
    return out.view(t, h * d)
