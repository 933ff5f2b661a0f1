"""Continuous batching: which tokens of which sequences go into the next forward pass.

Each step, under a budget of `max_batched_tokens` tokens:
  1. every running sequence that is decoding gets its one token (oldest first), so streams keep
     their pace whatever arrives;
  2. running sequences still in (chunked) prefill get chunks from what budget is left;
  3. waiting sequences are admitted in arrival order while the budget, the `max_num_seqs` cap
     and free blocks allow. Admission looks the prompt up in the prefix cache and skips every
     cached full block, but always leaves at least the last token to compute, because the
     forward pass must produce its logits.

When a growing sequence finds no free block, the youngest running sequence not yet scheduled
this step is preempted by recompute (vLLM's policy): its blocks are freed and it goes back to
the head of the queue with everything it generated so far; on readmission it prefills prompt +
generated tokens and continues. Its published full blocks stay in the prefix cache, so that
recompute is mostly cache hits unless the blocks were evicted meanwhile. The engine only admits
requests whose prompt + max_tokens fit in the whole pool, so the oldest running sequence can
always finish by preempting the others: the scheduler never deadlocks.

A model whose every layer slides a window (Mistral v0.1) needs only the blocks its next query
can see: after each step the blocks wholly behind the window go back to the pool, published
first, so they stay in the prefix cache and another sequence sharing them keeps its reference.
"""
from __future__ import annotations

import hashlib
import logging
from collections import deque
from dataclasses import dataclass, field

from daemon.errors import ConfigError
from engines.llm.block_pool import BlockPool, hash_blocks
from engines.llm.sequence import Sequence, SeqStatus

__all__ = ["SchedulerConfig", "ScheduledBatch", "Scheduler"]

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 32
    max_batched_tokens: int = 512
    # [llm] deterministic: every block is computed batch-invariantly. Otherwise a request that
    # asks for it alone hashes its blocks under its own root, so it only reuses blocks that
    # deterministic steps computed.
    deterministic: bool = False
    # Set when every layer of the model slides this window: the blocks wholly behind it are
    # returned to the pool as a sequence moves on (after being offered to the prefix cache).
    window: int | None = None

    def validate(self) -> None:
        if self.max_num_seqs < 1:
            raise ConfigError("llm.max_num_seqs", "must be >= 1")
        if self.max_batched_tokens < self.max_num_seqs:
            # Every running sequence must be able to decode in the same step.
            raise ConfigError("llm.max_batched_tokens", "must be >= llm.max_num_seqs")


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)        # tokens computed per sequence
    sample_rows: list[int] = field(default_factory=list)    # rows whose logits get sampled

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)

    def add(self, seq: Sequence, n: int) -> None:
        if seq.num_computed + n == len(seq.token_ids):
            self.sample_rows.append(len(self.seqs))
        self.seqs.append(seq)
        self.num_new.append(n)


class Scheduler:
    """Owns the waiting queue, the running list and every sequence's block table."""

    def __init__(self, pool: BlockPool, cfg: SchedulerConfig) -> None:
        cfg.validate()
        self.pool = pool
        self.cfg = cfg
        self.block_size = pool.block_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []             # admission order: oldest first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def oldest_wait(self, now: float) -> float:
        """Seconds the oldest never-admitted request has waited (0 when none waits); preempted
        sequences do not count, they were admitted once already."""
        # New requests join at the tail, so the first never-admitted one is the oldest.
        return next((now - s.arrival for s in self.waiting if not s.admitted), 0.0)

    def abort(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is and free its blocks now."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        self._release(seq)

    # -- scheduling --------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.cfg.max_batched_tokens
        done: set[Sequence] = set()
        i = 0
        while i < len(self.running) and budget > 0:          # 1. decodes
            seq = self.running[i]
            if seq.num_pending == 1:
                if not self._reserve(seq, 1, done, may_preempt_self=True):
                    continue                                  # seq itself was preempted
                batch.add(seq, 1)
                done.add(seq)
                budget -= 1
            i += 1
        i = 0
        while i < len(self.running) and budget > 0:          # 2. running prefills
            seq = self.running[i]
            i += 1
            if seq in done:
                continue
            n = self._fit(seq, min(seq.num_pending, budget), done)
            if n > 0:
                batch.add(seq, n)
                done.add(seq)
                budget -= n
        while (self.waiting and budget > 0                    # 3. admissions
               and len(self.running) < self.cfg.max_num_seqs):
            n = self._admit(self.waiting[0], budget)
            if n == 0:
                break
            seq = self.waiting.popleft()
            self.running.append(seq)
            batch.add(seq, n)
            budget -= n
        return batch

    def update(self, batch: ScheduledBatch, sampled: list[int]) -> list[str | None]:
        """Record a finished forward pass and the tokens sampled for `batch.sample_rows`.

        Publishes newly filled blocks to the prefix cache and releases finished sequences.
        Returns the finish reason (or None) per sampled row.
        """
        for seq, n in zip(batch.seqs, batch.num_new):
            seq.num_computed += n
            self._publish(seq)
            self._drop_behind_window(seq)
        reasons: list[str | None] = []
        finished = False
        for row, tok in zip(batch.sample_rows, sampled):
            seq = batch.seqs[row]
            reason = seq.append(tok)
            reasons.append(reason)
            if reason is not None:
                seq.finish_reason = reason
                self._release(seq)
                finished = True
        if finished:
            self.running = [s for s in self.running if s.status is SeqStatus.RUNNING]
        return reasons

    def fail(self, batch: ScheduledBatch) -> None:
        """Release every sequence of a batch whose forward pass failed."""
        for seq in batch.seqs:
            if seq.status is SeqStatus.RUNNING:
                self._release(seq)
        self.running = [s for s in self.running if s.status is SeqStatus.RUNNING]

    # -- blocks ------------------------------------------------------------------------------

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _reserve(self, seq: Sequence, n: int, done: set[Sequence], *,
                 may_preempt_self: bool) -> bool:
        """Make `seq`'s block table cover `n` more tokens, preempting younger sequences."""
        need = self._blocks_for(seq.num_computed + n) - len(seq.block_table)
        while need > self.pool.num_free:
            victim = self._victim(seq, done)
            if victim is seq and not may_preempt_self:
                return False
            self._preempt(victim)
            if victim is seq:
                return False
        if need > 0:
            seq.block_table.extend(self.pool.allocate(need))
        return True

    def _fit(self, seq: Sequence, n: int, done: set[Sequence]) -> int:
        """Tokens of a prefill chunk (at most `n`) that blocks can be found for."""
        if self._reserve(seq, n, done, may_preempt_self=False):
            return n
        # No younger sequence left to preempt: take a smaller chunk from the free blocks.
        room = (len(seq.block_table) + self.pool.num_free) * self.block_size - seq.num_computed
        n = min(n, room)
        if n > 0:
            self._reserve(seq, n, done, may_preempt_self=False)
        return max(n, 0)

    def _victim(self, seq: Sequence, done: set[Sequence]) -> Sequence:
        """The youngest running sequence not scheduled this step (possibly `seq` itself)."""
        for cand in reversed(self.running):
            if cand is seq or cand not in done:
                return cand
        return seq

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Give the head of the queue its cached prefix and blocks for its first chunk."""
        bs = self.block_size
        self._extend_hashes(seq)
        hits = self.pool.lookup(seq.block_hashes[:(len(seq.token_ids) - 1) // bs])
        computed = len(hits) * bs
        n = min(len(seq.token_ids) - computed, budget)
        need = self._blocks_for(computed + n) - len(hits)
        if need > self.pool.num_free - self.pool.num_reclaimed_by(hits):
            return 0
        self.pool.acquire(hits)
        seq.block_table = hits + self.pool.allocate(need)
        seq.num_computed = computed
        seq.num_published = len(hits)
        seq.status = SeqStatus.RUNNING
        if not seq.admitted:
            seq.admitted = True
            seq.num_cached = computed
            self.pool.record_query(seq.num_prompt, computed)
        return n

    def _extend_hashes(self, seq: Sequence) -> None:
        start = len(seq.block_hashes)
        if start < len(seq.token_ids) // self.block_size:
            parent = seq.block_hashes[-1] if start else self._root(seq)
            seq.block_hashes.extend(hash_blocks(parent, seq.token_ids, self.block_size, start))

    def _root(self, seq: Sequence) -> bytes:
        if seq.params.deterministic and not self.cfg.deterministic:
            return hashlib.blake2b(self.pool.root + b"deterministic", digest_size=len(
                self.pool.root)).digest()
        return self.pool.root

    def _publish(self, seq: Sequence) -> None:
        """Offer every block whose K/V is now complete to the prefix cache."""
        full = seq.num_computed // self.block_size
        if full <= seq.num_published:
            return
        self._extend_hashes(seq)
        if self.pool.events is None:
            for b in range(seq.num_published, full):
                self.pool.cache_block(seq.block_table[b], seq.block_hashes[b])
        else:                                   # KV-cache events want the chain and tokens
            bs = self.block_size
            for b in range(seq.num_published, full):
                self.pool.cache_block(seq.block_table[b], seq.block_hashes[b],
                                      seq.block_hashes[b - 1] if b else None,
                                      seq.token_ids[b * bs:(b + 1) * bs])
        seq.num_published = full

    def _drop_behind_window(self, seq: Sequence) -> None:
        """Return the blocks no later query of `seq` can see (the next one, at position
        num_computed, sees keys from num_computed - window + 1 on) to the pool. Only published
        blocks go: they stay in the prefix cache (reusable until evicted), and a block another
        sequence shares keeps that sequence's reference."""
        if self.cfg.window is None:
            return
        first_seen = max(0, seq.num_computed + 1 - self.cfg.window) // self.block_size
        upto = min(first_seen, seq.num_published)
        if upto > seq.num_dropped:
            self.pool.free(seq.block_table[seq.num_dropped:upto])
            seq.num_dropped = upto

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.free(seq.block_table[seq.num_dropped:])
        seq.block_table = []
        seq.num_dropped = 0
        seq.num_computed = 0
        seq.num_published = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        log.debug("preempted %s (%d tokens) to free blocks", seq.id, len(seq.token_ids))

    def _release(self, seq: Sequence) -> None:
        self.pool.free(seq.block_table[seq.num_dropped:])
        seq.block_table = []
        seq.num_dropped = 0
        seq.status = SeqStatus.FINISHED
