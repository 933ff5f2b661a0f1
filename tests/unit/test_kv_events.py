"""KV-cache events: a tiny random Llama publishes on a real PUB socket, a real SUB socket decodes
them with a decoder written from vLLM's definition, and they match the engine's real blocks."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest

from engines.base import GenerateRequest
from engines.llm.block_pool import hash_blocks
from engines.llm.engine import LLMEngine, LLMOptions
from engines.llm.config import ModelLoadFailed
from engines.llm.kv_events import (AllBlocksCleared, BlockRemoved, BlockStored, encode_batch,
                                   wire_hash)
from engines.llm.model import random_model
from tests.kv_event_subscriber import Cleared, Removed, Stored, Subscriber
from tests.unit.test_llm_engine import CFG, drain, greedy, make_engine

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("one_torch_thread")]

BS = 4                                      # make_engine's block size


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, seed=0)


@pytest.fixture
def endpoint():
    d = Path(tempfile.mkdtemp(prefix="fykv", dir="/tmp"))     # ipc paths stay short
    yield f"ipc://{d}/kv.sock"
    shutil.rmtree(d, ignore_errors=True)


def subscribed(engine: LLMEngine, endpoint: str) -> Subscriber:
    """A subscriber that has provably joined: PUB drops messages until the subscription has
    reached it, so probe until one arrives (then nothing published later is lost)."""
    sub = Subscriber(endpoint)
    deadline = time.monotonic() + 20
    assert engine.kv_events is not None
    while True:
        assert time.monotonic() < deadline, "subscriber never joined"
        engine.kv_events.publish(time.time(), [AllBlocksCleared()])
        batch = sub.recv(0.2)
        if batch is not None:
            assert batch.events == [Cleared()]
            while (extra := sub.recv(0.05)) is not None:         # other probes in flight
                assert extra.events == [Cleared()]
            return sub


def run(engine: LLMEngine, rid: str, prompt: list[int]) -> None:
    engine.submit(GenerateRequest(rid, prompt, greedy(max_tokens=1)))
    drain(engine)


def stored_count(n: int):
    return lambda evs: sum(len(e.block_hashes) for e in evs if isinstance(e, Stored)) >= n


def test_events_match_the_engines_blocks(model, endpoint):
    engine = make_engine(model, blocks=8, kv_events_endpoint=endpoint)
    pool = engine.pool
    assert pool is not None and pool.num_blocks == 8
    sub = subscribed(engine, endpoint)
    try:
        a = list(range(10, 20))                                   # 2 full blocks + 2 tokens
        run(engine, "a", a)
        ha = hash_blocks(pool.root, a, BS)
        assert len(pool.lookup(ha)) == 2                          # the engine cached both
        evs = sub.events_until(stored_count(2), 10)
        assert evs == [Stored([wire_hash(h) for h in ha], None, a[:8], BS, None, "GPU")]

        b = a[:4] + list(range(60, 66))                           # shares a's first block
        run(engine, "b", b)
        hb = hash_blocks(pool.root, b, BS)
        assert hb[0] == ha[0]
        evs = sub.events_until(stored_count(1), 10)
        # only the new block is stored, chained to the shared one
        assert evs == [Stored([wire_hash(hb[1])], wire_hash(ha[0]), b[4:8], BS, None, "GPU")]

        # 7 fresh blocks out of 8: the 5 never-cached ones, then the two least recently freed
        # cached ones (a's second block, then b's), while a's first block survives.
        c = list(range(30, 58))
        run(engine, "c", c)
        hc = hash_blocks(pool.root, c, BS)
        evs = sub.events_until(stored_count(7), 10)
        removed = [wire_hash(ha[1]), wire_hash(hb[1])]
        assert evs == [Removed(removed, "GPU"),
                       Stored([wire_hash(h) for h in hc], None, c, BS, None, "GPU")]
        assert pool.lookup([ha[1]]) == [] and pool.lookup([hb[0], hb[1]]) == pool.lookup([ha[0]])
        assert len(pool.lookup(hc)) == 7

        engine.unload()
        assert sub.events_until(lambda e: bool(e), 10) == [Cleared()]
        assert engine.kv_events is None
    finally:
        sub.close()
        if engine.kv_events is not None:
            engine.unload()


def test_reset_prefix_cache_reports_removals(model, endpoint):
    engine = make_engine(model, blocks=16, kv_events_endpoint=endpoint)
    pool = engine.pool
    assert pool is not None
    sub = subscribed(engine, endpoint)
    try:
        prompt = list(range(40, 53))                              # 3 full blocks
        run(engine, "p", prompt)
        hashes = [wire_hash(h) for h in hash_blocks(pool.root, prompt, BS)]
        sub.events_until(stored_count(3), 10)
        pool.reset_prefix_cache()
        engine.step()                                             # nothing to run: flushes
        evs = sub.events_until(lambda e: bool(e), 10)
        # freed last-to-first, so evicted tail first
        assert evs == [Removed(hashes[::-1], "GPU")]
    finally:
        sub.close()
        engine.unload()


# msgspec 0.22's encoding of KVEventBatch(1.5, [BlockStored([5, 2**64 - 1], 3, [1, 2], 1, None,
# "GPU", None), BlockRemoved([7], "GPU"), AllBlocksCleared()], 0) with vLLM's struct definitions
# (array_like=True, tag=True), taken once with msgspec installed.
VLLM_BYTES = bytes.fromhex(
    "93cb3ff80000000000009399ab426c6f636b53746f7265649205cfffffffffffffffff0392010201c0a34750"
    "55c0c093ac426c6f636b52656d6f7665649107a347505591b0416c6c426c6f636b73436c656172656400")


def test_encoding_is_byte_for_byte_vllms():
    events = [BlockStored([5, 2**64 - 1], 3, [1, 2], 1), BlockRemoved([7]), AllBlocksCleared()]
    assert encode_batch(1.5, events) == VLLM_BYTES


def test_wire_hash_is_the_first_8_bytes_big_endian():
    h = bytes(range(1, 17))
    assert wire_hash(h) == 0x0102030405060708


def test_off_by_default_opens_no_socket(model):
    engine = make_engine(model, blocks=8)
    assert engine.kv_events is None and engine.pool is not None and engine.pool.events is None
    run(engine, "a", list(range(10, 20)))
    engine.unload()


@pytest.mark.parametrize("bad", ["127.0.0.1:5557", "udp://x", 5557])
def test_bad_endpoint_names_the_key(bad):
    with pytest.raises(ModelLoadFailed, match="kv_events_endpoint"):
        LLMOptions.from_section({"kv_events_endpoint": bad})


@pytest.mark.parametrize("bad", ["kv@{pod}", "kv@{0}", "kv@{", 7])
def test_bad_topic_names_the_key(bad):
    with pytest.raises(ModelLoadFailed, match="kv_events_topic"):
        LLMOptions.from_section({"kv_events_topic": bad})


def test_publisher_takes_over_a_busy_endpoint_and_never_blocks(endpoint):
    """A new model version binds the endpoint its old version still holds: until that one lets
    go, batches are dropped (not queued up, not blocking), and the sequence numbers show the gap."""
    import zmq

    from engines.llm.kv_publisher import KVEventPublisher

    old = zmq.Context.instance().socket(zmq.PUB)
    old.bind(endpoint)
    pub = KVEventPublisher(endpoint, "t")
    try:
        t0 = time.monotonic()
        for _ in range(100):
            pub.publish(time.time(), [AllBlocksCleared()])
        assert time.monotonic() - t0 < 1.0
        deadline = time.monotonic() + 10
        while pub.dropped < 100:
            assert time.monotonic() < deadline, pub.dropped
            time.sleep(0.01)
        old.close(0)
        sub = Subscriber(endpoint)
        try:
            deadline = time.monotonic() + 20
            while (batch := sub.recv(0.2)) is None:
                assert time.monotonic() < deadline, "publisher never took the endpoint over"
                pub.publish(time.time(), [AllBlocksCleared()])
            assert batch.topic == b"t" and batch.seq >= 100 and batch.events == [Cleared()]
        finally:
            sub.close()
    finally:
        pub.close()
        old.close(0)


def test_the_sender_ends_on_close_even_when_its_stop_marker_cannot_be_queued(endpoint):
    """close() gives up queueing its stop marker when the queue stays full; the thread must
    still end (and unbind the endpoint) rather than wait on the queue forever."""
    from engines.llm.kv_publisher import KVEventPublisher

    pub = KVEventPublisher(endpoint, "t")
    time.sleep(0.3)                      # bound, waiting for batches
    pub._stop.set()                      # what close() leaves when the queue is full
    pub._thread.join(3)
    assert not pub._thread.is_alive()
