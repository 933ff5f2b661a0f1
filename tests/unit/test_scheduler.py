"""Scheduler: decode-first chunked prefill, prefix reuse, preemption by recompute, no deadlock.

A fake model stands in for the transformer: it writes each scheduled token into the slot its
block table names and "predicts" the next token from the context it READS BACK from the blocks.
Any scheduler bug that corrupts KV (a block freed while in use, a wrong prefix hit, a stale block
table) therefore changes the generated tokens, and the tests compare them with a reference.
"""
from __future__ import annotations

import random

import pytest

from daemon.errors import ConfigError
from engines.llm.block_pool import BlockPool
from engines.llm.sampling import SamplingParams
from engines.llm.scheduler import Scheduler, SchedulerConfig
from engines.llm.sequence import Sequence, SeqStatus

pytestmark = pytest.mark.timeout(60)

VOCAB = 50


class FakeModel:
    """Slots hold tokens instead of K/V; next token = f(context read back from the slots)."""

    def __init__(self, pool: BlockPool) -> None:
        self.bs = pool.block_size
        self.slots: dict[tuple[int, int], int] = {}

    def forward(self, seq: Sequence, n: int) -> int:
        start = seq.num_computed
        for pos in range(start, start + n):
            self.slots[seq.block_table[pos // self.bs], pos % self.bs] = seq.token_ids[pos]
        ctx = [self.slots[seq.block_table[p // self.bs], p % self.bs] for p in range(start + n)]
        assert ctx == seq.token_ids[:start + n], f"{seq.id}: KV read back differs"
        return next_token(ctx)


def next_token(ctx: list[int]) -> int:
    return (sum(t * (i + 1) for i, t in enumerate(ctx)) * 7 + len(ctx)) % VOCAB


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    toks = list(prompt)
    for _ in range(max_tokens):
        toks.append(next_token(toks))
    return toks[len(prompt):]


def make_seq(rid: str, prompt: list[int], max_tokens: int = 5) -> Sequence:
    return Sequence.create(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0),
                           eos_ids=())


def run_step(sched: Scheduler, model: FakeModel) -> list:
    batch = sched.schedule()
    tokens = [model.forward(seq, n) for seq, n in zip(batch.seqs, batch.num_new)]
    sampled = [tokens[r] for r in batch.sample_rows]
    sched.update(batch, sampled)
    return batch


def run_all(sched: Scheduler, model: FakeModel, max_steps: int = 10_000) -> int:
    steps = 0
    while sched.has_work():
        batch = run_step(sched, model)
        assert batch.seqs, "a step with work scheduled nothing"
        steps += 1
        assert steps < max_steps, "scheduler made no progress"
    return steps


def test_decodes_go_first_and_long_prompts_are_chunked():
    pool = BlockPool(64, 4)
    sched = Scheduler(pool, SchedulerConfig(max_num_seqs=8, max_batched_tokens=16))
    model = FakeModel(pool)
    a, b = make_seq("a", [1, 2, 3], 20), make_seq("b", [4, 5], 20)
    sched.add(a)
    sched.add(b)
    batch = run_step(sched, model)
    assert [s.id for s in batch.seqs] == ["a", "b"] and batch.num_new == [3, 2]
    long = make_seq("long", list(range(40)), 3)
    sched.add(long)
    batch = run_step(sched, model)
    assert [(s.id, n) for s, n in zip(batch.seqs, batch.num_new)] == \
        [("a", 1), ("b", 1), ("long", 14)]
    assert batch.sample_rows == [0, 1]                    # the chunk produces no token yet
    batch = run_step(sched, model)
    assert [(s.id, n) for s, n in zip(batch.seqs, batch.num_new)] == \
        [("a", 1), ("b", 1), ("long", 14)]
    batch = run_step(sched, model)
    assert [(s.id, n) for s, n in zip(batch.seqs, batch.num_new)] == \
        [("a", 1), ("b", 1), ("long", 12)]
    assert batch.sample_rows == [0, 1, 2]
    run_all(sched, model)
    assert long.token_ids[40:] == reference(list(range(40)), 3)
    assert a.token_ids[3:] == reference([1, 2, 3], 20)


def test_max_num_seqs_caps_the_running_set():
    pool = BlockPool(64, 4)
    sched = Scheduler(pool, SchedulerConfig(max_num_seqs=2, max_batched_tokens=64))
    model = FakeModel(pool)
    for i in range(5):
        sched.add(make_seq(f"s{i}", [i + 1] * 3, 4))
    batch = run_step(sched, model)
    assert [s.id for s in batch.seqs] == ["s0", "s1"]
    assert len(sched.waiting) == 3
    run_all(sched, model)
    assert pool.num_free == 64


def test_admission_skips_cached_blocks_but_recomputes_the_last_token():
    pool = BlockPool(32, 4)
    sched = Scheduler(pool, SchedulerConfig(max_num_seqs=4, max_batched_tokens=64))
    model = FakeModel(pool)
    prompt = list(range(1, 13))                            # exactly 3 full blocks
    first = make_seq("first", prompt, 2)
    sched.add(first)
    run_all(sched, model)
    assert first.num_cached == 0
    second = make_seq("second", prompt + [20, 21], 2)
    sched.add(second)
    batch = run_step(sched, model)
    assert second.num_cached == 12 and batch.num_new == [2]
    assert second.block_table[:3] == [0, 1, 2]             # first's blocks, shared
    third = make_seq("third", prompt, 2)                   # whole prompt cached
    sched.add(third)
    batch = run_step(sched, model)
    # The last block is recomputed so the final prompt token yields logits.
    assert third.num_cached == 8 and batch.num_new[-1] == 4
    run_all(sched, model)
    assert second.token_ids[14:] == reference(prompt + [20, 21], 2)
    assert third.token_ids[12:] == first.token_ids[12:]
    st = pool.stats()
    assert (st.query_tokens, st.hit_tokens) == (12 + 14 + 12, 20)
    assert st.free == 32 and st.used == 0


def test_preemption_recomputes_the_youngest_and_everything_finishes():
    pool = BlockPool(10, 4)                                # 40 token slots
    sched = Scheduler(pool, SchedulerConfig(max_num_seqs=8, max_batched_tokens=32))
    model = FakeModel(pool)
    prompts = {f"s{i}": [i + 1] * (6 + i) for i in range(5)}
    seqs = [make_seq(rid, p, 12) for rid, p in prompts.items()]
    for s in seqs:
        sched.add(s)
    run_all(sched, model)
    assert sched.num_preemptions > 0
    for s in seqs:
        assert s.status is SeqStatus.FINISHED and s.finish_reason == "length"
        assert s.token_ids[s.num_prompt:] == reference(prompts[s.id], 12)
    assert pool.num_free == 10
    assert all(pool.ref_count(b) == 0 for b in range(10))


def test_the_victim_is_the_youngest_and_returns_to_the_head_of_the_queue():
    pool = BlockPool(4, 2)
    sched = Scheduler(pool, SchedulerConfig(max_num_seqs=4, max_batched_tokens=16))
    model = FakeModel(pool)
    old, young = make_seq("old", [1, 2, 3], 4), make_seq("young", [4, 5, 6], 4)
    waiting = make_seq("waiting", [7], 1)
    for s in (old, young, waiting):
        sched.add(s)
    run_step(sched, model)                                 # old, young: 2 blocks each
    assert sched.waiting[0] is waiting
    run_step(sched, model)                                 # 4 tokens each: still 2 blocks
    run_step(sched, model)                                 # old needs a 3rd block
    assert sched.num_preemptions == 1
    assert list(sched.waiting)[:2] == [young, waiting]
    assert young.block_table == [] and young.num_computed == 0
    run_all(sched, model)
    assert young.token_ids[3:] == reference([4, 5, 6], 4)


def test_abort_frees_blocks_at_once():
    pool = BlockPool(16, 4)
    sched = Scheduler(pool, SchedulerConfig(max_num_seqs=4, max_batched_tokens=64))
    model = FakeModel(pool)
    running, queued = make_seq("r", list(range(1, 10)), 50), make_seq("q", [1], 5)
    sched.add(running)
    run_step(sched, model)
    sched.add(queued)
    assert pool.num_free == 16 - 3
    sched.abort(running)
    assert pool.num_free == 16 and running.status is SeqStatus.FINISHED
    sched.abort(queued)
    assert not sched.has_work()


@pytest.mark.parametrize("seed", range(40))
def test_random_workloads_never_hang_and_never_corrupt_kv(seed):
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 4, 8])
    max_seqs = rng.randint(1, 8)
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_batched_tokens=rng.randint(max_seqs, 40))
    num_blocks = rng.randint(4, 24)
    pool = BlockPool(num_blocks, bs)
    sched = Scheduler(pool, cfg)
    model = FakeModel(pool)
    capacity = num_blocks * bs
    shared = [rng.randrange(VOCAB) for _ in range(capacity)]
    seqs = []
    for i in range(rng.randint(1, 12)):
        total = rng.randint(2, capacity)                   # prompt + max_tokens fits the pool
        plen = rng.randint(1, total - 1)
        prompt = shared[:rng.randint(0, plen)]             # shared prefixes exercise the cache
        prompt += [rng.randrange(VOCAB) for _ in range(plen - len(prompt))]
        seqs.append(make_seq(f"s{i}", prompt, total - plen))
    cancel = {s.id for s in seqs if rng.random() < 0.15}
    for s in seqs:
        sched.add(s)
    steps = 0
    while sched.has_work():
        run_step(sched, model)
        steps += 1
        assert steps < 5000
        for s in seqs:
            if s.id in cancel and s.status is not SeqStatus.FINISHED and rng.random() < 0.2:
                sched.abort(s)
                cancel.discard(s.id)
    for s in seqs:
        if s.id not in cancel and s.finish_reason is not None:
            prompt = s.token_ids[:s.num_prompt]
            assert s.token_ids[s.num_prompt:] == reference(prompt, s.params.max_tokens)
    assert pool.num_free == num_blocks
    assert all(pool.ref_count(b) == 0 for b in range(num_blocks))


def test_config_is_validated():
    with pytest.raises(ConfigError) as err:
        SchedulerConfig(max_num_seqs=0).validate()
    assert err.value.key == "llm.max_num_seqs"
    with pytest.raises(ConfigError) as err:
        Scheduler(BlockPool(4, 4), SchedulerConfig(max_num_seqs=8, max_batched_tokens=4))
    assert err.value.key == "llm.max_batched_tokens"
