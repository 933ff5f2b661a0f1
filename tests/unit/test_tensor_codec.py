"""The one tensor codec (daemon/tensor_bytes.py): every bad form a sender or a wire can hold is
refused with its stable code, by the frontends, the engines and the Python client alike."""
from __future__ import annotations

import numpy as np
import pytest

from daemon import protocol as P
from daemon.errors import InvalidInput
from daemon.shm import Arena, RegionMap
from daemon.tensor_bytes import decode, encode, from_buffer, serialize
from frontends.client.client import ClientRegion, _infer_message, _result_arrays
from frontends.tensor_io import pack

F32x4 = np.arange(4, dtype=np.float32).tobytes()      # 16 bytes: a [2, 2] float32 tensor


def _refused(call, code: str, param: str = "x") -> InvalidInput:
    with pytest.raises(InvalidInput) as err:
        call()
    assert err.value.code == code and err.value.status == 400, err.value.message
    assert err.value.param == param
    return err.value


@pytest.mark.parametrize("dtype, shape, data, code", [
    ("float32", (2, 2), F32x4[:12], "invalid_shape"),           # truncated buffer
    ("float32", (2, 2), F32x4 + b"\0" * 4, "invalid_shape"),    # bytes no element claims
    ("float32", (3, 2), F32x4, "invalid_shape"),                # shape and size disagree
    ("float32", (-2, -2), F32x4, "invalid_shape"),              # negative dims, product 4
    ("float32", (-1, 4), F32x4, "invalid_shape"),               # numpy's "infer this dim"
    ("float32", (0, 2**40, 2**40), b"", "invalid_shape"),       # 0 bytes, but no array that big
    ("bytes", (0, 2**61), b"", "invalid_shape"),
    ("float32", (1,) * (P.MAX_RANK + 1), F32x4[:4], "invalid_shape"),
    ("float32", (True, 4), F32x4, "invalid_shape"),             # a bool is not a dim
    ("complex64", (2,), F32x4, "invalid_dtype"),                # a dtype the wire lacks
    ("float128", (1,), F32x4, "invalid_dtype"),
    ("<f4", (2, 2), F32x4, "invalid_dtype"),                    # byte order is not a dtype
    ("bytes", (2,), b"\x01\x00\x00\x00a", "invalid_data"),      # one BYTES element for two
    ("bytes", (1,), b"\x09\x00\x00\x00ab", "invalid_data"),     # element runs past the end
])
def test_bad_forms_are_refused_with_their_code(dtype, shape, data, code):
    _refused(lambda: from_buffer("x", dtype, shape, data), code)
    ref = P.TensorRef("x", dtype, shape, frame=0)
    _refused(lambda: decode(ref, [data]), code)


def test_good_forms_decode_exactly():
    ref = P.TensorRef("x", "float32", (2, 2), frame=0)
    out = decode(ref, [memoryview(F32x4)])
    assert out.shape == (2, 2) and out.tolist() == [[0, 1], [2, 3]]
    assert decode(P.TensorRef("e", "int64", (0, 5), frame=0), [b""]).shape == (0, 5)
    assert decode(P.TensorRef("s", "int32", (), frame=0), [b"\x07\0\0\0"]).tolist() == 7
    strings = np.array([b"a", b""], dtype=object)
    assert decode(P.TensorRef("b", "bytes", (2,), frame=0),
                  [serialize(strings)]).tolist() == [b"a", b""]


def test_a_ref_naming_a_missing_frame_or_an_unusable_region_is_a_bad_message():
    with pytest.raises(P.BadMessage):
        decode(P.TensorRef("x", "float32", (2, 2), frame=1), [F32x4])
    with pytest.raises(P.BadMessage):
        decode(P.TensorRef("x", "float32", (2, 2)), [F32x4])      # neither inline nor shm
    with pytest.raises(P.BadMessage):
        decode(P.TensorRef("x", "float32", (2, 2), shm=P.ShmLoc("r", 0, 16)), [])


def test_decode_reads_a_region_and_checks_its_bounds():
    arena = Arena(f"fy-codec-test-{np.random.randint(1 << 30)}", 1 << 12)
    regions = RegionMap("fy-none-")
    try:
        loc = arena.put(np.arange(4, dtype=np.float32))
        regions.register("codec-r", arena.name, 0, arena.size)
        ref = P.TensorRef("x", "float32", (2, 2), shm=P.ShmLoc("codec-r", loc.offset, 16))
        assert decode(ref, [], regions).tolist() == [[0, 1], [2, 3]]
        ref.shm = P.ShmLoc("codec-r", arena.size - 8, 16)
        _refused(lambda: decode(ref, [], regions), "shm_out_of_bounds", param=None)
    finally:
        regions.close()
        arena.close(unlink=True)


@pytest.mark.parametrize("arr", [
    np.zeros(2, np.complex64),
    np.array(["a", "b"]),                            # numpy unicode: not BYTES until object
    np.array([1, b"x"], dtype=object),               # an object array of anything but bytes
    np.zeros(2, np.float16).astype(np.dtype([("a", "<f2")])),
])
def test_unsendable_arrays_are_refused_by_every_sender(arr):
    """The frontends' packer and the Python client refuse the same arrays with the same code,
    before any byte is stored or sent."""
    _refused(lambda: encode("x", arr), "invalid_dtype")
    _refused(lambda: pack({"x": arr}, None, 1 << 20), "invalid_dtype")
    _refused(lambda: _infer_message("m", {"ok": np.zeros(2, np.float32), "x": arr},
                                    version=None, outputs=None, timeout_s=None, region=None,
                                    out_shm=None, request_id=""), "invalid_dtype")


def test_encode_gives_native_c_ordered_bytes_and_keeps_0d():
    big = np.arange(6, dtype=">i4").reshape(2, 3).T              # big-endian, not C-ordered
    ref, data = encode("x", big)
    assert (ref.dtype, ref.shape) == ("int32", (3, 2)) and ref.frame is None and ref.shm is None
    assert data.flags.c_contiguous and data.dtype.isnative
    assert decode(P.TensorRef("x", ref.dtype, ref.shape, frame=0), [data.tobytes()]).tolist() \
        == big.tolist()
    ref, data = encode("s", np.float64(2.5))
    assert ref.shape == () and data.shape == ()
    ref, data = encode("b", np.array(["é", b"\0"], dtype=object))
    assert ref.dtype == "bytes" and data.tobytes() == serialize(
        np.array(["é".encode(), b"\0"], dtype=object)).tobytes()


def test_the_client_checks_every_result_it_reads():
    good = P.InferResult("i", [P.TensorRef("y", "float32", (2, 2), frame=0)])
    assert _result_arrays(good, [F32x4], None)["y"].shape == (2, 2)
    _refused(lambda: _result_arrays(good, [F32x4[:12]], None), "invalid_shape", param="y")
    wild = P.InferResult("i", [P.TensorRef("y", "float32", (-2, -2), frame=0)])
    _refused(lambda: _result_arrays(wild, [F32x4], None), "invalid_shape", param="y")


def test_a_client_region_stores_bytes_tensors_in_their_serialized_form():
    region = ClientRegion("codec-client", 1 << 12)
    try:
        arr = np.array([[b"ab", b""], [b"\xff", b"cde"]], dtype=object)
        ref = region.put("t", arr)
        assert ref.dtype == "bytes" and ref.shape == (2, 2) and ref.shm is not None
        assert region.read(ref).tolist() == arr.tolist()
        _refused(lambda: region.put("x", np.zeros(2, np.complex64)), "invalid_dtype")
    finally:
        region.close()
