"""The tracing fields of the wire protocol: `trace` on Infer / Generate, `timing` on InferResult /
Tokens. Untraced messages leave them out of the header; traced ones round-trip; bad forms are
BadMessage naming the field."""
from __future__ import annotations

import msgpack
import pytest

from daemon import protocol as P

TRACE = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"


def _infer(**kw) -> P.Infer:
    return P.Infer("r", "m", 1, [P.TensorRef("x", "float32", (2,), frame=0)], **kw)


def _generate(**kw) -> P.Generate:
    return P.Generate("g", "m", 1, [P.TensorRef("prompt", "int32", (2,), frame=0)],
                      {"max_tokens": 3}, **kw)


@pytest.mark.parametrize("msg", [_infer(), _generate(), P.InferResult("r", []),
                                 P.Tokens("g", [1])])
def test_untraced_messages_carry_no_tracing_keys(msg):
    header = msgpack.unpackb(P.encode(msg, [b"12345678"])[0])
    assert "trace" not in header and "timing" not in header
    assert P.decode(P.encode(msg, [b"12345678"]))[0] == msg


@pytest.mark.parametrize("msg", [
    _infer(trace=TRACE), _generate(trace=TRACE),
    P.InferResult("r", [], 5, 6, 2, timing=[1, 2, 3]),
    P.Tokens("g", [1], finished=True, finish_reason="length", timing=[1, 2, 3, 4, 5, 1]),
])
def test_traced_messages_round_trip(msg):
    back, _ = P.decode(P.encode(msg, [b"12345678"]))
    assert back == msg


@pytest.mark.parametrize("field,value", [
    ("trace", 7), ("trace", ["00"]), ("trace", "x" * 257), ("trace", b"00-ab"),
])
def test_bad_trace_fields(field, value):
    header = msgpack.unpackb(P.encode(_infer(), [b"12345678"])[0])
    header[field] = value
    with pytest.raises(P.BadMessage, match=field):
        P.decode([msgpack.packb(header, use_bin_type=True), b"12345678"])


def test_a_long_but_bounded_trace_string_decodes():
    # a malformed context is the receiver's to ignore (a new trace), not a protocol error
    msg, _ = P.decode(P.encode(_infer(trace="x" * 256), [b"12345678"]))
    assert msg.trace == "x" * 256


@pytest.mark.parametrize("value", [[1.5], ["1"], list(range(17)), {"a": 1}, 3])
def test_bad_timing_fields(value):
    header = msgpack.unpackb(P.encode(P.InferResult("r", []))[0])
    header["timing"] = value
    with pytest.raises(P.BadMessage, match="timing"):
        P.decode([msgpack.packb(header)])
