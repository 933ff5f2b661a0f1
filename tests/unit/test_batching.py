"""DynamicBatcher, collate and split: exact clocks, no threads."""
from __future__ import annotations

import numpy as np
import pytest

from daemon.errors import Busy, InvalidInput
from engines.base import TensorRequest
from engines.batching import BatchConfig, DynamicBatcher, Padding, collate, split

T0 = 100.0


def req(rid: str, rows: int = 1, seq: int = 4, at: float = T0, deadline: float | None = None,
        dtype: str = "float32") -> TensorRequest:
    x = np.arange(rows * seq, dtype=dtype).reshape(rows, seq) + 1
    return TensorRequest(rid, {"x": x}, deadline=deadline, arrival=at)


def batcher(max_batch: int = 8, delay_us: float = 1000, preferred: tuple[int, ...] = (),
            timeout_ms: float = 0, padding: Padding | None = None) -> DynamicBatcher:
    config = BatchConfig(max_batch_size=max_batch, max_queue_delay_s=delay_us / 1e6,
                         preferred_batch_sizes=preferred, default_timeout_s=timeout_ms / 1e3)
    return DynamicBatcher(config, padding)


def ids(requests: list[TensorRequest]) -> list[str]:
    return [r.id for r in requests]


def test_empty_queue_is_never_ready():
    b = batcher()
    assert not b.ready(T0) and b.wait_hint(T0) is None
    assert b.take(T0) == ([], [])


def test_full_batch_goes_at_once_and_the_rest_waits():
    b = batcher(max_batch=4)
    for i in range(5):
        b.add(req(f"r{i}"))
    assert b.ready(T0)
    batch, expired = b.take(T0)
    assert ids(batch) == ["r0", "r1", "r2", "r3"] and expired == []
    assert len(b) == 1 and not b.ready(T0)


def test_rows_not_requests_fill_a_batch():
    b = batcher(max_batch=8)
    b.add(req("a", rows=3))
    b.add(req("b", rows=3))
    assert not b.ready(T0)
    b.add(req("c", rows=3))            # 9 rows would not fit: the first two cannot grow
    assert b.ready(T0)
    assert ids(b.take(T0)[0]) == ["a", "b"]


def test_preferred_size_goes_before_the_delay():
    b = batcher(max_batch=16, preferred=(4,))
    for i in range(3):
        b.add(req(f"r{i}"))
    assert not b.ready(T0)
    b.add(req("r3"))
    assert b.ready(T0) and b.wait_hint(T0) == 0.0
    assert ids(b.take(T0)[0]) == ["r0", "r1", "r2", "r3"]


def test_largest_preferred_size_is_taken_and_the_rest_left():
    b = batcher(max_batch=16, preferred=(2, 4))
    for i in range(5):
        b.add(req(f"r{i}"))
    assert ids(b.take(T0)[0]) == ["r0", "r1", "r2", "r3"]
    assert len(b) == 1


def test_delay_expiry_sends_a_partial_batch_with_exact_wait_hint():
    b = batcher(max_batch=8, delay_us=500)
    b.add(req("a", at=T0))
    b.add(req("b", at=T0 + 0.0002))
    assert b.wait_hint(T0 + 0.0001) == pytest.approx(0.0004, abs=1e-12)
    assert not b.ready(T0 + 0.0004)
    assert b.take(T0 + 0.0004) == ([], [])
    now = T0 + b.wait_hint(T0)           # a loop that sleeps exactly the hint finds it ready
    assert b.ready(now)
    assert ids(b.take(now)[0]) == ["a", "b"]


def test_zero_delay_sends_whatever_is_queued():
    b = batcher(max_batch=8, delay_us=0)
    b.add(req("a"))
    assert b.ready(T0) and ids(b.take(T0)[0]) == ["a"]


def test_expired_requests_are_returned_and_never_batched():
    b = batcher(max_batch=8, delay_us=1000)
    b.add(req("late", deadline=T0 + 0.0002))
    b.add(req("ok"))
    assert b.wait_hint(T0) == pytest.approx(0.0002)
    assert b.ready(T0 + 0.0002)
    batch, expired = b.take(T0 + 0.0002)
    assert ids(expired) == ["late"] and batch == []
    assert len(b) == 1
    batch, expired = b.take(T0 + 0.001)
    assert ids(batch) == ["ok"] and expired == []


def test_default_timeout_sets_a_deadline():
    b = batcher(max_batch=8, delay_us=10_000, timeout_ms=2)
    b.add(req("a"))
    assert b.wait_hint(T0) == pytest.approx(0.002)
    batch, expired = b.take(T0 + 0.002)
    assert ids(expired) == ["a"] and batch == []


def test_different_shapes_or_dtypes_never_share_a_batch():
    b = batcher(max_batch=8, delay_us=0)
    b.add(req("s4"))
    b.add(req("s5", seq=5, at=T0 + 1e-6))
    b.add(req("s4b", at=T0 + 2e-6))
    b.add(req("i64", dtype="int64", at=T0 + 3e-6))
    now = T0 + 1e-5
    assert ids(b.take(now)[0]) == ["s4", "s4b"]        # oldest group first
    assert ids(b.take(now)[0]) == ["s5"]
    assert ids(b.take(now)[0]) == ["i64"]
    assert len(b) == 0


def test_remove_drops_a_queued_request():
    b = batcher(max_batch=2)
    b.add(req("a"))
    b.add(req("b"))
    assert b.remove("a").id == "a"
    assert b.remove("a") is None
    assert len(b) == 1 and ids(b.take(T0 + 1)[0]) == ["b"]


def test_no_batch_dim_runs_each_request_alone():
    b = batcher(max_batch=0, delay_us=1000)
    b.add(TensorRequest("a", {"x": np.zeros((3, 3), np.float32)}, arrival=T0))
    b.add(TensorRequest("b", {"x": np.zeros((3, 3), np.float32)}, arrival=T0))
    assert ids(b.take(T0)[0]) == ["a"]


def test_a_request_larger_than_max_batch_is_refused():
    with pytest.raises(InvalidInput) as err:
        batcher(max_batch=2).add(req("big", rows=3))
    assert err.value.code == "batch_too_large"


def test_a_full_queue_refuses_with_busy():
    b = DynamicBatcher(BatchConfig(max_batch_size=4, max_queue_size=2))
    b.add(req("a"))
    b.add(req("b"))
    with pytest.raises(Busy) as err:
        b.add(req("c"))
    assert (err.value.code, err.value.status) == ("busy", 503) and len(b) == 2
    b.take(T0)
    b.add(req("c"))                     # room again once a batch has left


def test_collate_concatenates_once_and_split_returns_views():
    reqs = [req("a", rows=2), req("b", rows=1)]
    feeds = collate(reqs)
    np.testing.assert_array_equal(feeds["x"], np.concatenate([r.inputs["x"] for r in reqs]))
    outs = split({"y": feeds["x"] * 10}, reqs)
    np.testing.assert_array_equal(outs[0]["y"], reqs[0].inputs["x"] * 10)
    np.testing.assert_array_equal(outs[1]["y"], reqs[1].inputs["x"] * 10)


def test_a_lone_request_is_passed_through_without_copy():
    r = req("a", rows=2)
    assert collate([r])["x"] is r.inputs["x"]


def test_split_gives_each_request_only_the_outputs_it_asked_for():
    a, b = req("a"), req("b")
    b.outputs = ["z"]
    outs = split({"y": np.ones((2, 1)), "z": np.zeros((2, 1))}, [a, b])
    assert set(outs[0]) == {"y", "z"} and set(outs[1]) == {"z"}


PAD = Padding(values={"x": 0, "mask": 0}, axes={"x": (1,), "mask": (1,)},
              unpad={"y": ((1, "x", 1),)})


def padded_req(rid: str, seq: int, at: float = T0) -> TensorRequest:
    x = np.arange(1, seq + 1, dtype=np.int64)[None, :]
    return TensorRequest(rid, {"x": x, "mask": np.ones_like(x)}, arrival=at)


def test_declared_padding_lets_lengths_share_a_batch():
    b = batcher(max_batch=8, delay_us=0, padding=PAD)
    b.add(padded_req("short", 2))
    b.add(padded_req("long", 5))
    batch, _ = b.take(T0)
    assert ids(batch) == ["short", "long"]
    feeds = collate(batch, PAD)
    np.testing.assert_array_equal(feeds["x"], [[1, 2, 0, 0, 0], [1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(feeds["mask"], [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])


def test_padding_without_declaration_keeps_lengths_apart():
    b = batcher(max_batch=8, delay_us=0)
    b.add(padded_req("short", 2))
    b.add(padded_req("long", 5))
    assert ids(b.take(T0)[0]) == ["short"]


def test_outputs_with_a_padded_axis_are_cut_back_per_request():
    batch = [padded_req("short", 2), padded_req("long", 5)]
    feeds = collate(batch, PAD)
    outs = split({"y": feeds["x"] * 2, "pooled": feeds["x"].sum(axis=1)}, batch, PAD)
    np.testing.assert_array_equal(outs[0]["y"], [[2, 4]])
    assert outs[0]["y"].flags.c_contiguous
    np.testing.assert_array_equal(outs[1]["y"], [[2, 4, 6, 8, 10]])
    np.testing.assert_array_equal(outs[0]["pooled"], [3])


def test_padding_fills_every_padded_axis_of_a_3d_input():
    pad = Padding(values={"x": -1}, axes={"x": (1, 2)})
    a = TensorRequest("a", {"x": np.ones((1, 1, 2), np.int64)})
    b = TensorRequest("b", {"x": np.full((1, 2, 1), 7, np.int64)})
    out = collate([a, b], pad)["x"]
    np.testing.assert_array_equal(out, [[[1, 1], [-1, -1]], [[7, -1], [7, -1]]])


def test_config_from_section_validates_and_names_the_key():
    cfg = BatchConfig.from_section({"max_queue_delay_us": 500, "preferred_batch_sizes": [4, 2],
                                    "default_timeout_ms": 20, "pad_dims": {"x": 0}}, 8)
    assert cfg.max_queue_delay_s == pytest.approx(0.0005)
    assert cfg.preferred_batch_sizes == (2, 4) and cfg.default_timeout_s == pytest.approx(0.02)
    for section, key in [({"max_queue_delay_us": -1}, "max_queue_delay_us"),
                         ({"preferred_batch_sizes": [16]}, "preferred_batch_sizes"),
                         ({"preferred_batch_sizes": "4"}, "preferred_batch_sizes"),
                         ({"default_timeout_ms": "1"}, "default_timeout_ms"),
                         ({"pad_dims": {"x": "zero"}}, "pad_dims"),
                         ({"max_queue_size": -1}, "max_queue_size")]:
        with pytest.raises(InvalidInput) as err:
            BatchConfig.from_section(section, 8)
        assert err.value.code == "invalid_model_config" and key in err.value.message
