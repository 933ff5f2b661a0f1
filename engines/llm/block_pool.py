"""Paged KV block pool with prefix caching.

The KV cache is cut into `num_blocks` fixed-size blocks of `block_size` token slots. A sequence
owns a block table (a list of block ids); blocks are reference counted so several sequences can
share the blocks of a common prompt prefix.

Prefix caching: a FULL block is named by a hash chain, `h_i = H(h_{i-1}, tokens of block i)`,
seeded with a model key so two models never share entries. The hash is BLAKE2b (16 bytes), not
Python's `hash()`: tokens come from untrusted clients, and a crafted collision would hand one
tenant another tenant's KV. A block whose last user releases it keeps its hash and stays
reusable until a fresh block is needed; such blocks are evicted least recently freed first,
and only after every never-cached free block has been used.

Everything is deterministic (fresh blocks are handed out in id order, evictions in release
order), so tests can assert exact block ids.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from engines.llm.kv_events import KVEventLog

__all__ = ["BlockPool", "BlockPoolExhausted", "PoolStats", "hash_blocks", "root_hash"]

_DIGEST = 16


class BlockPoolExhausted(RuntimeError):
    """More blocks were asked for than are free; the scheduler checks first, so this is a bug."""


def root_hash(model_key: str | bytes) -> bytes:
    """The chain seed for one model: blocks of different models never collide."""
    key = model_key.encode() if isinstance(model_key, str) else model_key
    return hashlib.blake2b(b"ferry-kv\0" + key, digest_size=_DIGEST).digest()


def hash_blocks(parent: bytes, token_ids: Sequence[int], block_size: int,
                start_block: int = 0) -> list[bytes]:
    """Chain hashes of the full blocks of `token_ids` from block `start_block` on.

    `parent` is the hash of block `start_block - 1` (or the root hash when starting at 0).
    A trailing partial block gets no hash: its contents are not final.
    """
    out: list[bytes] = []
    end = len(token_ids) // block_size
    for b in range(start_block, end):
        chunk = array("q", token_ids[b * block_size:(b + 1) * block_size]).tobytes()
        parent = hashlib.blake2b(parent + chunk, digest_size=_DIGEST).digest()
        out.append(parent)
    return out


@dataclass(slots=True)
class PoolStats:
    total: int
    free: int              # blocks a new allocation may take (never-cached + cached-free)
    cached: int            # blocks holding a hash (in use or free)
    cached_free: int       # free blocks that still hold reusable KV
    used: int              # blocks with ref count > 0
    query_tokens: int      # prompt tokens looked up in the prefix cache
    hit_tokens: int        # of which served from it

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


class BlockPool:
    """Block ids 0..num_blocks-1 with ref counts, a free list and a prefix-cache index."""

    def __init__(self, num_blocks: int, block_size: int, model_key: str | bytes = b"") -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.root = root_hash(model_key)
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._by_hash: dict[bytes, int] = {}
        self._fresh: deque[int] = deque(range(num_blocks))       # free, holding nothing reusable
        self._lru: OrderedDict[int, None] = OrderedDict()         # free but cached, oldest first
        self._query_tokens = 0
        self._hit_tokens = 0
        # Set to record what enters and leaves the prefix cache (KV-cache events); None: off.
        self.events: KVEventLog | None = None

    # -- capacity ----------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._fresh) + len(self._lru)

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def block_hash(self, block_id: int) -> bytes | None:
        return self._hash[block_id]

    # -- allocation --------------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """Take `n` blocks (ref count 1), fresh ones first, then evicting cached-free ones."""
        if n > self.num_free:
            raise BlockPoolExhausted(f"asked for {n} blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._fresh:
                bid = self._fresh.popleft()
            else:
                bid, _ = self._lru.popitem(last=False)
                self._evict(bid)
            self._ref[bid] = 1
            out.append(bid)
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block.

        Blocks are released last-to-first so that, among equally old entries, a chain's tail is
        evicted before its head: a cached head still serves prompts sharing a shorter prefix,
        while a cached tail without its head is unreachable.
        """
        for bid in reversed(block_ids):
            ref = self._ref[bid] - 1
            if ref < 0:
                raise RuntimeError(f"block {bid} freed more often than taken")
            self._ref[bid] = ref
            if ref == 0:
                if self._hash[bid] is None:
                    self._fresh.append(bid)
                else:
                    self._lru[bid] = None

    # -- prefix cache ------------------------------------------------------------------------

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """Block ids of the longest cached prefix of `hashes`; takes no references."""
        out = []
        for h in hashes:
            bid = self._by_hash.get(h)
            if bid is None:
                break
            out.append(bid)
        return out

    def num_reclaimed_by(self, block_ids: Sequence[int]) -> int:
        """How many of `block_ids` are free now, i.e. would leave the free count on `acquire`."""
        return sum(1 for bid in block_ids if self._ref[bid] == 0)

    def acquire(self, block_ids: Sequence[int]) -> None:
        """Take a reference to cached blocks found by `lookup` (reviving free ones)."""
        for bid in block_ids:
            if self._ref[bid] == 0:
                del self._lru[bid]
            self._ref[bid] += 1

    def cache_block(self, block_id: int, block_hash: bytes, parent: bytes | None = None,
                    token_ids: Sequence[int] = ()) -> None:
        """Publish a block that has just become full. First writer wins on duplicates: the
        later block stays private and returns to the fresh list when freed. `parent` (None for
        a chain's first block) and `token_ids` only feed the event log."""
        if self._hash[block_id] is not None or block_hash in self._by_hash:
            return
        self._hash[block_id] = block_hash
        self._by_hash[block_hash] = block_id
        if self.events is not None:
            self.events.stored(block_hash, parent, token_ids)

    def record_query(self, query_tokens: int, hit_tokens: int) -> None:
        self._query_tokens += query_tokens
        self._hit_tokens += hit_tokens

    def reset_prefix_cache(self) -> None:
        """Forget every cached-free block (e.g. after weights change)."""
        while self._lru:
            bid, _ = self._lru.popitem(last=False)
            self._evict(bid)
            self._fresh.append(bid)

    def stats(self) -> PoolStats:
        used = sum(1 for r in self._ref if r)
        return PoolStats(total=self.num_blocks, free=self.num_free, cached=len(self._by_hash),
                         cached_free=len(self._lru), used=used,
                         query_tokens=self._query_tokens, hit_tokens=self._hit_tokens)

    def _evict(self, bid: int) -> None:
        h = self._hash[bid]
        if h is not None:
            self._hash[bid] = None
            if self._by_hash.get(h) == bid:
                del self._by_hash[h]
                if self.events is not None:
                    self.events.removed(h)
