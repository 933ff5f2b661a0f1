"""pack/unpack: small tensors inline, large ones through the arena, a full arena falls back to
inline, and what arrives through encode/decode reads back exactly (zero-copy from shm)."""
from __future__ import annotations

import os
import uuid
from typing import Iterator

import numpy as np
import pytest
import zmq

from daemon import protocol as P
from daemon.errors import InvalidInput
from daemon.shm import Arena, RegionMap, segment_name
from frontends.tensor_io import pack, unpack

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def instance() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def arena(instance) -> Iterator[Arena]:
    a = Arena(segment_name(instance, "eng"), 4096)
    yield a
    a.close()


@pytest.fixture
def regions(instance) -> Iterator[RegionMap]:
    rm = RegionMap(instance)
    yield rm
    rm.close()


def _wire(packed, model: str = "m") -> tuple[P.Infer, list]:
    """Through the real encoding, as an engine would receive it."""
    msg, buffers = P.decode(P.encode(P.Infer("r", model, 1, packed.refs), packed.frames))
    return msg, buffers


def test_without_an_arena_everything_is_inline():
    arrays = {"a": np.arange(6, dtype=np.int64).reshape(2, 3), "b": np.ones(10_000, np.float32)}
    packed = pack(arrays, None, 16)
    assert [(r.name, r.dtype, r.shape, r.frame, r.shm) for r in packed.refs] == [
        ("a", "int64", (2, 3), 0, None), ("b", "float32", (10_000,), 1, None)]
    assert packed.blocks == [] and len(packed.frames) == 2


def test_threshold_splits_inline_from_shared_memory(arena):
    arrays = {"small": np.zeros(63, np.uint8), "edge": np.zeros(64, np.uint8),
              "big": np.arange(100, dtype=np.float32)}
    packed = pack(arrays, arena, 64)
    refs = {r.name: r for r in packed.refs}
    assert refs["small"].frame == 0 and refs["small"].shm is None
    assert refs["edge"].shm == P.ShmLoc(arena.name, 0, 64) and refs["edge"].frame is None
    assert refs["big"].shm == P.ShmLoc(arena.name, 64, 400)
    assert packed.blocks == [refs["edge"].shm, refs["big"].shm]
    assert len(packed.frames) == 1 and arena.used_bytes == 64 + 448


def test_full_arena_falls_back_to_inline(arena):
    hog = arena.alloc(4096 - 128)
    arrays = {"fits": np.zeros(100, np.uint8), "too_big": np.arange(64, dtype=np.float32)}
    packed = pack(arrays, arena, 1)
    refs = {r.name: r for r in packed.refs}
    assert refs["fits"].shm == P.ShmLoc(arena.name, 4096 - 128, 100)
    assert refs["too_big"].shm is None and refs["too_big"].frame == 0
    assert packed.blocks == [refs["fits"].shm]
    np.testing.assert_array_equal(packed.frames[0], arrays["too_big"])
    arena.free(hog)


@pytest.mark.parametrize("arr", [
    np.array([{}, 1], dtype=object), np.array(["abc"]), np.array([b"ab"]),
    np.array(["2024-01-01"], dtype="datetime64[D]"), np.zeros(2, dtype=[("a", "i4")]),
    np.zeros(2, np.complex64)], ids=["object", "str", "bytes", "datetime", "struct", "complex"])
def test_dtypes_that_cannot_travel_are_refused(arena, arr):
    with pytest.raises(InvalidInput) as err:
        pack({"ok": np.zeros(2, np.float32), "x": arr}, arena, 1)
    assert err.value.code == "invalid_dtype" and err.value.param == "x"
    assert arena.used_bytes == 0            # nothing was copied for the valid input either


def test_input_given_inline_and_by_region_is_refused():
    ref = P.TensorRef("x", "float32", (2,), shm=P.ShmLoc("client", 0, 8))
    with pytest.raises(InvalidInput) as err:
        pack({"x": np.zeros(2, np.float32)}, None, 0, [ref])
    assert err.value.code == "invalid_input"


def test_region_refs_lead_and_keep_their_reference():
    ref = P.TensorRef("r", "float32", (2,), shm=P.ShmLoc("client", 0, 8))
    packed = pack({"x": np.zeros(2, np.float32)}, None, 0, [ref])
    assert [r.name for r in packed.refs] == ["r", "x"] and packed.refs[0] is ref
    assert packed.blocks == []


ARRAYS = {
    "f32": np.arange(12, dtype=np.float32).reshape(3, 4),
    "i8": np.array([-128, 0, 127], np.int8),
    "bool": np.array([[True, False]]),
    "f16": np.linspace(-1, 1, 200).astype(np.float16),
    "scalar": np.array(7, np.int32),
    "empty": np.zeros((0, 5), np.float64),
    "strided": np.arange(40, dtype=np.int64).reshape(5, 8)[:, ::3],
    "big_endian": np.arange(300, dtype=">f4"),
    "u64": np.array([2 ** 64 - 1, 0], np.uint64),
}


@pytest.mark.parametrize("threshold", [0, 64, 1 << 30], ids=["all-shm", "mixed", "all-inline"])
def test_round_trip_through_the_wire(arena, regions, threshold):
    packed = pack(ARRAYS, arena, threshold)
    msg, buffers = _wire(packed)
    arrays, frees = unpack(msg.inputs, buffers, regions, arena.name)
    assert list(arrays) == list(ARRAYS)
    for name, want in ARRAYS.items():
        assert arrays[name].dtype == want.dtype.newbyteorder("=")
        assert arrays[name].shape == want.shape
        np.testing.assert_array_equal(arrays[name], want)
    assert sorted(frees, key=lambda s: s.offset) == packed.blocks
    del arrays
    for loc in frees:
        arena.free(loc.offset)
    assert arena.used_bytes == 0


def test_shared_memory_tensors_are_views_not_copies(arena, regions):
    packed = pack({"x": np.zeros(32, np.float32)}, arena, 0)
    msg, buffers = _wire(packed)
    arrays, frees = unpack(msg.inputs, buffers, regions, "ferry-somebody-else")
    assert frees == []                      # not the engine's arena: nothing to give back
    loc = packed.blocks[0]
    arena.buf[loc.offset:loc.offset + 4] = np.float32(2.5).tobytes()
    assert arrays["x"][0] == 2.5


def test_zmq_frames_are_read_without_copying(regions):
    arr = np.arange(5, dtype=np.int16)
    packed = pack({"x": arr}, None, 1 << 20)
    frames = [zmq.Frame(f) for f in P.encode(P.Infer("r", "m", 1, packed.refs), packed.frames)]
    msg, buffers = P.decode(frames)
    arrays, _ = unpack(msg.inputs, buffers, regions)
    np.testing.assert_array_equal(arrays["x"], arr)


@pytest.mark.parametrize("size", [0, 9, 11, 20])
def test_inline_frame_of_the_wrong_size_is_refused(regions, size):
    ref = P.TensorRef("x", "int16", (5,), frame=0)
    with pytest.raises(InvalidInput) as err:
        unpack([ref], [b"\0" * size], regions)
    assert err.value.code == "invalid_shape" and err.value.param == "x"


def test_reference_outside_a_registered_region_is_refused(arena, regions):
    client = Arena(f"fyt-{os.getpid()}-{uuid.uuid4().hex[:6]}", 256)
    try:
        regions.register("in0", client.name, 0, 128)
        ref = P.TensorRef("x", "float32", (64,), shm=P.ShmLoc("in0", 0, 256))
        with pytest.raises(InvalidInput) as err:
            unpack([ref], [], regions)
        assert err.value.code == "shm_out_of_bounds"
    finally:
        regions.close()
        client.close()
