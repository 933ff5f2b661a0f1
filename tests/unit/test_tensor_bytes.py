"""Triton's serialized BYTES form, as both sides of every process boundary read and write it."""
from __future__ import annotations

import numpy as np
import pytest

from daemon.errors import InvalidInput
from daemon.tensor_bytes import deserialize, from_buffer, serialize, to_buffer, wire_dtype


def test_round_trip_keeps_nulls_empty_and_non_utf8_elements():
    arr = np.array([[b"he\x00llo", b""], [b"\xff\xfe", "é"]], dtype=object)
    buf = serialize(arr)
    assert buf.dtype == np.uint8
    assert buf[:4].tobytes() == (6).to_bytes(4, "little") and buf[4:10].tobytes() == b"he\x00llo"
    back = deserialize(buf, (2, 2), "x")
    assert back.shape == (2, 2) and back.tolist() == [[b"he\x00llo", b""],
                                                      [b"\xff\xfe", "é".encode()]]
    assert wire_dtype(arr) == "bytes" and from_buffer("x", "bytes", (2, 2), to_buffer(arr)).tolist() \
        == back.tolist()


@pytest.mark.parametrize("data, shape", [
    (b"\x05\x00\x00\x00ab", (1,)),                 # element runs past the data
    (b"\x01\x00", (1,)),                           # length prefix cut short
    (b"\x01\x00\x00\x00a\x00", (1,)),              # a byte no element claims
    (b"\x01\x00\x00\x00a", (2,)),                  # one element for two
])
def test_malformed_data_is_invalid_data(data, shape):
    with pytest.raises(InvalidInput) as err:
        deserialize(data, shape, "x")
    assert err.value.code == "invalid_data" and err.value.param == "x"


def test_fixed_size_frame_of_the_wrong_size_is_invalid_shape():
    with pytest.raises(InvalidInput) as err:
        from_buffer("x", "int32", (2, 2), b"\x00" * 12)
    assert err.value.code == "invalid_shape"
    assert from_buffer("x", "int32", (2, 2), np.arange(4, dtype=np.int32).tobytes()).tolist() \
        == [[0, 1], [2, 3]]


def test_a_huge_shape_with_little_data_is_refused_before_allocating():
    import time
    started = time.perf_counter()
    with pytest.raises(InvalidInput) as err:
        deserialize(b"\x00" * 8, (2**31 - 1,), "t")     # 2 elements' worth of lengths
    assert err.value.code == "invalid_data" and "element 2 " in err.value.message
    assert time.perf_counter() - started < 0.5          # was ~1 min and 16 GB for 2**31
