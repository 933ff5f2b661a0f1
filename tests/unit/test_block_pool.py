"""Block pool: exact block ids for allocation, prefix hits, eviction order and ref counts."""
from __future__ import annotations

import pytest

from engines.llm.block_pool import BlockPool, BlockPoolExhausted, hash_blocks, root_hash

pytestmark = pytest.mark.timeout(30)


def cached_seq(pool: BlockPool, tokens: list[int]) -> tuple[list[int], list[bytes]]:
    """Allocate blocks for `tokens` and publish its full blocks, as the scheduler does."""
    hashes = hash_blocks(pool.root, tokens, pool.block_size)
    blocks = pool.allocate(-(-len(tokens) // pool.block_size))
    for bid, h in zip(blocks, hashes):
        pool.cache_block(bid, h)
    return blocks, hashes


def test_fresh_blocks_come_in_id_order_and_return_to_the_back():
    pool = BlockPool(8, 4)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) == [3, 4]
    assert pool.num_free == 3
    assert [pool.ref_count(b) for b in range(8)] == [1, 1, 1, 1, 1, 0, 0, 0]
    pool.free([0, 1, 2])                       # released last-to-first: 2, 1, 0
    assert pool.num_free == 6
    assert pool.allocate(6) == [5, 6, 7, 2, 1, 0]


def test_exhaustion_raises_and_changes_nothing():
    pool = BlockPool(4, 4)
    pool.allocate(3)
    with pytest.raises(BlockPoolExhausted):
        pool.allocate(2)
    assert pool.num_free == 1
    assert pool.allocate(1) == [3]
    with pytest.raises(BlockPoolExhausted):
        pool.allocate(1)
    assert pool.stats().used == 4


def test_double_free_is_refused():
    pool = BlockPool(2, 4)
    blocks = pool.allocate(1)
    pool.free(blocks)
    with pytest.raises(RuntimeError):
        pool.free(blocks)


def test_hash_chain_is_prefix_stable_and_keyed_by_model():
    tokens = list(range(10))
    root = root_hash("model-a")
    full = hash_blocks(root, tokens, 4)
    assert len(full) == 2                                  # the partial third block has no hash
    assert hash_blocks(root, tokens[:8], 4) == full
    assert hash_blocks(full[0], tokens, 4, start_block=1) == full[1:]
    assert hash_blocks(root_hash("model-b"), tokens, 4)[0] != full[0]
    # A block's hash depends on every token before it, not only on its own tokens.
    other = hash_blocks(root, [99] + tokens[1:], 4)
    assert other[0] != full[0] and other[1] != full[1]


def test_prefix_hit_takes_references_on_the_leading_cached_blocks():
    pool = BlockPool(8, 4)
    blocks, hashes = cached_seq(pool, list(range(12)))
    assert blocks == [0, 1, 2]
    assert pool.lookup(hashes) == [0, 1, 2]
    diverging = hash_blocks(pool.root, list(range(8)) + [50, 51, 52, 53], 4)
    assert pool.lookup(diverging) == [0, 1]                # stops at the first miss
    assert pool.lookup(hash_blocks(pool.root, [7] * 8, 4)) == []
    hits = pool.lookup(diverging)
    assert pool.num_reclaimed_by(hits) == 0                # still in use: costs no free block
    pool.acquire(hits)
    assert [pool.ref_count(b) for b in (0, 1, 2)] == [2, 2, 1]
    pool.free(blocks)
    assert [pool.ref_count(b) for b in (0, 1, 2)] == [1, 1, 0]
    assert pool.num_free == 6                              # 5 fresh + block 2 cached-free
    assert pool.stats().cached_free == 1


def test_freed_cached_blocks_stay_reusable_until_needed():
    pool = BlockPool(4, 4)
    blocks, hashes = cached_seq(pool, list(range(8)))
    pool.free(blocks)
    st = pool.stats()
    assert (st.free, st.cached, st.cached_free, st.used) == (4, 2, 2, 0)
    hits = pool.lookup(hashes)
    assert hits == [0, 1]
    assert pool.num_reclaimed_by(hits) == 2
    pool.acquire(hits)
    assert pool.num_free == 2 and pool.ref_count(0) == 1
    assert pool.allocate(2) == [2, 3]                      # revived blocks are not handed out
    with pytest.raises(BlockPoolExhausted):
        pool.allocate(1)


def test_eviction_uses_fresh_blocks_first_then_least_recently_freed():
    pool = BlockPool(5, 2)
    a_blocks, a_hashes = cached_seq(pool, [1, 2, 3, 4])    # blocks 0, 1
    b_blocks, b_hashes = cached_seq(pool, [5, 6])          # block 2
    pool.free(a_blocks)                                    # LRU: 1, 0 (tail first)
    pool.free(b_blocks)                                    # LRU: 1, 0, 2
    assert pool.allocate(2) == [3, 4]                      # fresh blocks before any eviction
    assert pool.stats().cached == 3
    assert pool.allocate(1) == [1]                         # A's tail goes first
    assert pool.lookup(a_hashes) == [0]                    # A's head still serves
    assert pool.block_hash(1) is None
    assert pool.allocate(1) == [0]
    assert pool.lookup(a_hashes) == []
    assert pool.lookup(b_hashes) == [2]
    assert pool.allocate(1) == [2]
    assert pool.stats().cached == 0


def test_a_revived_block_is_freed_again_at_the_back_of_the_lru():
    pool = BlockPool(3, 2)
    a, ha = cached_seq(pool, [1, 2])
    b, hb = cached_seq(pool, [3, 4])
    pool.free(a)
    pool.free(b)                                           # LRU: 0, 1
    pool.acquire(pool.lookup(ha))                          # block 0 used again...
    pool.free([0])                                         # ...and freed last: LRU 1, 0
    assert pool.allocate(2) == [2, 1]
    assert pool.lookup(ha) == [0] and pool.lookup(hb) == []


def test_duplicate_content_keeps_the_first_block_and_frees_the_second_as_fresh():
    pool = BlockPool(4, 2)
    first, hashes = cached_seq(pool, [1, 2])
    second, _ = cached_seq(pool, [1, 2])                   # computed concurrently, same tokens
    assert (first, second) == ([0], [1])
    assert pool.block_hash(1) is None
    assert pool.lookup(hashes) == [0]
    pool.free(second)
    pool.free(first)
    assert pool.stats().cached_free == 1
    assert pool.allocate(3) == [2, 3, 1]                   # block 1 went back as a fresh block


def test_hit_rate_counts_tokens():
    pool = BlockPool(4, 4)
    assert pool.stats().hit_rate == 0.0
    pool.record_query(20, 16)
    pool.record_query(20, 0)
    assert pool.stats().hit_rate == pytest.approx(0.4)


def test_reset_prefix_cache_forgets_free_blocks_only():
    pool = BlockPool(4, 2)
    a, ha = cached_seq(pool, [1, 2])
    b, hb = cached_seq(pool, [3, 4])
    pool.free(a)
    pool.reset_prefix_cache()
    assert pool.lookup(ha) == [] and pool.lookup(hb) == [1]
    assert pool.num_free == 3


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        BlockPool(0, 16)
    with pytest.raises(ValueError):
        BlockPool(4, 0)
