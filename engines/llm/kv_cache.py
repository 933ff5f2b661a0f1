"""The paged KV cache and how one forward batch addresses it.

K and V live in fixed-size blocks (vLLM's layout): a token at absolute position `pos` of a sequence
sits in block `block_table[pos // block_size]` at offset `pos % block_size`. Which block belongs to
which sequence is the block pool's business; this module only turns block tables into the index
tensors a forward pass needs, once per step, so that the 30-odd layers reuse them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engines.llm.config import LlamaConfig

__all__ = ["PagedKVCache", "AttentionMetadata", "DecodeGroup", "PrefillSeq"]


class PagedKVCache:
    """K/V storage for every layer: `k[layer]`, `v[layer]` are [num_blocks, block_size, KV, D]."""

    def __init__(self, cfg: LlamaConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        # zeros, not empty: padded decode gathers read unused slots, and NaN garbage there would
        # survive masking (0 * NaN) in some attention kernels.
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(cfg.num_layers)]
        self._scratch: tuple[torch.Tensor, ...] | None = None

    @staticmethod
    def bytes_per_block(cfg: LlamaConfig, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block costs across all layers, K and V: for sizing from a memory budget."""
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem

    @classmethod
    def from_budget(cls, cfg: LlamaConfig, budget_bytes: int, block_size: int,
                    dtype: torch.dtype, device: torch.device | str) -> PagedKVCache:
        """As many blocks as fit in `budget_bytes` (at least one)."""
        per_block = cls.bytes_per_block(cfg, block_size, dtype)
        return cls(cfg, max(1, budget_bytes // per_block), block_size, dtype, device)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store new tokens' K/V ([T, KV, D]) at flat slot indices `slots` ([T])."""
        kv_shape = self.k[layer].shape[2:]
        self.k[layer].view(-1, *kv_shape).index_copy_(0, slots, k.to(self.dtype))
        self.v[layer].view(-1, *kv_shape).index_copy_(0, slots, v.to(self.dtype))

    def gather(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of the given blocks laid end to end: blocks [..., nb] -> [..., nb * bs, KV, D].

        The result lives in a scratch buffer that the next `gather` overwrites: fresh multi-MB
        allocations every layer cost page faults on CPU, and each result is used at once.
        """
        flat = blocks.reshape(-1)
        block_shape = self.k[layer].shape[1:]                          # [bs, KV, D]
        need = flat.numel() * block_shape.numel()
        if self._scratch is None or self._scratch[0].numel() < need:
            # A normal (not inference-mode) tensor, so that gathers work in and out of
            # torch.inference_mode alike.
            with torch.inference_mode(False):
                self._scratch = tuple(torch.empty(need + need // 2, dtype=self.dtype,
                                                  device=self.device) for _ in range(2))
        shape = (*blocks.shape[:-1], -1, *block_shape[1:])
        out_k = self._scratch[0][:need].view(flat.numel(), *block_shape)
        out_v = self._scratch[1][:need].view(flat.numel(), *block_shape)
        # index_select over whole blocks: several times faster on CPU than advanced indexing.
        torch.index_select(self.k[layer], 0, flat, out=out_k)
        torch.index_select(self.v[layer], 0, flat, out=out_v)
        return out_k.view(shape), out_v.view(shape)


@dataclass(slots=True)
class DecodeGroup:
    """Sequences with exactly one new token, attended together over a padded gather."""

    rows: torch.Tensor | None       # [Bd] their token rows in the batch; None: all rows, in order
    block_table: torch.Tensor       # [Bd, nb] int64, padded with block 0
    key_mask: torch.Tensor          # [Bd, 1, 1, nb * bs] bool, True where a key exists


@dataclass(slots=True)
class PrefillSeq:
    """A sequence with several new tokens, attended on its own."""

    start: int                      # first row of its new tokens in the batch
    query_len: int
    context_len: int                # keys it reads back from `blocks` (windowed: the last ones)
    blocks: torch.Tensor | None     # [nb] its block ids; None: no cached prefix, use the new K/V
    mask: torch.Tensor | None       # [query_len, context_len] bool; None: plain causal


@dataclass(slots=True)
class AttentionMetadata:
    slots: torch.Tensor             # [T] flat slot (block * bs + offset) for each new token's K/V
    last_rows: torch.Tensor         # [B] row of each sequence's last new token
    decode: DecodeGroup | None
    prefills: list[PrefillSeq]

    @classmethod
    def build(cls, positions: torch.Tensor, query_lens: list[int], context_lens: list[int],
              block_tables: list[list[int]], block_size: int) -> AttentionMetadata:
        _check_batch(positions, query_lens, context_lens, block_tables, block_size)
        device = positions.device
        width = max(len(bt) for bt in block_tables)
        padded = torch.tensor([bt + [0] * (width - len(bt)) for bt in block_tables],
                              dtype=torch.int64, device=device)          # [B, nb]
        lens = torch.tensor(query_lens, dtype=torch.int64, device=device)
        seq_of_row = torch.repeat_interleave(torch.arange(len(query_lens), device=device), lens,
                                             output_size=positions.shape[0])   # no GPU sync
        slots = padded[seq_of_row, positions // block_size] * block_size + positions % block_size
        last_rows = torch.cumsum(lens, 0) - 1
        decode_ids = [i for i, q in enumerate(query_lens) if q == 1]
        decode = _decode_group(decode_ids, query_lens, context_lens, padded, block_size)
        prefills = []
        start = 0
        for i, (q, ctx) in enumerate(zip(query_lens, context_lens)):
            if q > 1:
                prefills.append(_prefill_seq(start, q, ctx, padded[i], block_size))
            start += q
        return cls(slots, last_rows, decode, prefills)

    def windowed(self, window: int, block_size: int) -> AttentionMetadata:
        """The same step for a sliding-window layer: the query at position t sees only the keys
        at positions p with t - p < window. Decode rows and cached-prefix chunks read back only
        the blocks that still hold such keys; the masks hide the rest of those blocks. The
        blocks behind the window stay allocated while a full-attention layer needs them; when
        every layer slides the scheduler returns them to the pool, and their stale table
        entries are never read here (deterministic rows read them and slice them away)."""
        decode = (self.decode if self.decode is None else
                  _windowed_decode(self.decode, window, block_size))
        return AttentionMetadata(self.slots, self.last_rows, decode,
                                 [_windowed_prefill(seq, window, block_size, self.slots.device)
                                  for seq in self.prefills])


def _check_batch(positions: torch.Tensor, query_lens: list[int], context_lens: list[int],
                 block_tables: list[list[int]], block_size: int) -> None:
    """Reject batches that would index outside a sequence's blocks (a scheduler bug, not input)."""
    if not query_lens or not (len(query_lens) == len(context_lens) == len(block_tables)):
        raise ValueError(f"batch lists differ in length or are empty: {len(query_lens)} query_lens, "
                         f"{len(context_lens)} context_lens, {len(block_tables)} block_tables")
    if sum(query_lens) != positions.shape[0]:
        raise ValueError(f"sum(query_lens)={sum(query_lens)} != {positions.shape[0]} tokens")
    for i, (q, ctx, bt) in enumerate(zip(query_lens, context_lens, block_tables)):
        if q < 1 or ctx < q or len(bt) * block_size < ctx:
            raise ValueError(f"sequence {i}: query_len={q}, context_len={ctx} and "
                             f"{len(bt)} blocks of {block_size} are inconsistent")


def _decode_group(ids: list[int], query_lens: list[int], context_lens: list[int],
                  padded: torch.Tensor, block_size: int) -> DecodeGroup | None:
    if not ids:
        return None
    device = padded.device
    longest = max(context_lens[i] for i in ids)
    nb = -(-longest // block_size)
    if len(ids) == len(query_lens):
        rows, table = None, padded[:, :nb]
    else:
        # A sequence's row is the sum of the query lengths before it.
        starts, acc = [], 0
        for q in query_lens:
            starts.append(acc)
            acc += q
        index = torch.tensor(ids, dtype=torch.int64, device=device)
        rows = torch.tensor([starts[i] for i in ids], dtype=torch.int64, device=device)
        table = padded.index_select(0, index)[:, :nb]
    ctx = torch.tensor([context_lens[i] for i in ids], dtype=torch.int64, device=device)
    key_mask = torch.arange(nb * block_size, device=device)[None, :] < ctx[:, None]
    return DecodeGroup(rows, table.contiguous(), key_mask[:, None, None, :])


def _prefill_seq(start: int, q: int, ctx: int, table_row: torch.Tensor,
                 block_size: int) -> PrefillSeq:
    if ctx == q:
        return PrefillSeq(start, q, ctx, None, None)
    nb = -(-ctx // block_size)
    device = table_row.device
    # Query i sits at absolute position ctx - q + i and sees every key at or before it.
    query_pos = torch.arange(ctx - q, ctx, device=device)
    mask = torch.arange(ctx, device=device)[None, :] <= query_pos[:, None]
    return PrefillSeq(start, q, ctx, table_row[:nb], mask)


def _windowed_decode(group: DecodeGroup, window: int, block_size: int) -> DecodeGroup:
    table, mask = group.block_table, group.key_mask                    # [Bd, nb], [Bd, 1, 1, L]
    width = table.shape[1]
    keep = min(width, -(-(window - 1) // block_size) + 1)  # blocks `window` keys can touch
    ctx = mask.sum(-1).view(-1, 1)                                     # [Bd, 1] keys per row
    first = (ctx - window).clamp(min=0) // block_size                  # first block still seen
    index = first + torch.arange(keep, device=table.device)            # [Bd, keep]
    # past a row's blocks the clamp re-reads its last one; those positions are >= ctx: masked
    pos = first * block_size + torch.arange(keep * block_size, device=table.device)
    seen = (pos >= ctx - window) & (pos < ctx)                         # [Bd, keep * bs]
    table = table.gather(1, index.clamp(max=width - 1)).contiguous()
    return DecodeGroup(group.rows, table, seen[:, None, None, :])


def _windowed_prefill(seq: PrefillSeq, window: int, block_size: int,
                      device: torch.device) -> PrefillSeq:
    if seq.mask is None and seq.query_len <= window:
        return seq                  # no query is `window` tokens past any key it sees
    q, ctx = seq.query_len, seq.context_len
    blocks, skip = seq.blocks, 0    # skip: leading positions no query of the chunk still sees
    if blocks is not None:          # a cached prefix: read back from the first block still seen
        first = max(0, ctx - q - window + 1) // block_size
        blocks, skip = blocks[first:], first * block_size
    query_pos = torch.arange(ctx - q, ctx, device=device)[:, None]
    keys = torch.arange(skip, ctx, device=device)[None, :]
    mask = (keys <= query_pos) & (query_pos - keys < window)           # [Q, ctx - skip]
    return PrefillSeq(seq.start, q, ctx - skip, blocks, mask)
