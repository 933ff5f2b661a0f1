"""decode() on hostile input: random bytes, random msgpack maps and mutated real encodings.

Whatever arrives, decode returns a message or raises InvalidInput / ProtocolMismatch; an
accepted message re-encodes to a header that decodes to the same message."""
from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon import protocol as P
from daemon.errors import FerryError, InvalidInput, ProtocolMismatch
from tests.unit.test_protocol import SAMPLES, _by_shm, _frames_for, _inline

pytestmark = pytest.mark.timeout(60)

FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_TYPES = sorted(P._REGISTRY)
_KEYS = sorted({"v", "t", "name", "dtype", "shape", "loc", "frame", "region", "offset", "nbytes"}
               | {f for cls in P._REGISTRY.values() for f in cls.__dataclass_fields__})

# msgpack's own value space: ints within 64 bits, text keys only (strict_map_key)
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2 ** 63), 2 ** 64 - 1),
    st.floats(allow_nan=True), st.text(max_size=12), st.binary(max_size=12),
    st.sampled_from(_TYPES + sorted(P.DTYPES) + ["object", "", "frame"]),
    st.sampled_from([0, 1, -1, 2 ** 40, 2 ** 31, 2 ** 63 - 1]))
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.one_of(st.sampled_from(_KEYS), st.text(max_size=6)), inner,
                        max_size=5)),
    max_leaves=15)
_buffers = st.lists(st.binary(max_size=64), max_size=3)


def _decode_or_refuse(frames: list[Any]) -> None:
    try:
        msg, bufs = P.decode(frames)
    except (InvalidInput, ProtocolMismatch) as exc:
        assert isinstance(exc, FerryError) and exc.status == 400
        assert exc.code in ("bad_message", "protocol_version")
        return
    assert isinstance(msg, P.Message) and type(msg) is P._REGISTRY[msg.TYPE]
    assert bufs == list(frames[1:])
    # what was accepted is a well-formed message: it encodes and decodes to itself
    again = P.encode(msg, bufs)
    assert P.encode(P.decode(again)[0], bufs)[0] == again[0]


@FUZZ
@given(header=st.binary(max_size=256), buffers=_buffers)
def test_random_bytes(header, buffers):
    _decode_or_refuse([header, *buffers])


@FUZZ
@given(version=st.one_of(st.just(P.PROTOCOL_VERSION), st.just(P.PROTOCOL_VERSION), _scalars),
       mtype=st.one_of(st.sampled_from(_TYPES), _values),
       fields=st.dictionaries(st.sampled_from(_KEYS), _values, max_size=8),
       buffers=_buffers)
def test_random_maps(version, mtype, fields, buffers):
    header = {**fields, "v": version, "t": mtype}
    _decode_or_refuse([msgpack.packb(header, use_bin_type=True), *buffers])


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key/index path inside a decoded header, so a mutation can reach nested fields."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


@st.composite
def _mutated(draw: st.DrawFn) -> list[Any]:
    mtype = draw(st.sampled_from(_TYPES))
    msg = SAMPLES[mtype](draw(st.sampled_from([_inline, _by_shm])))
    buffers = _frames_for(msg)
    header = msgpack.unpackb(P.encode(msg)[0])
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(header)
        path = draw(st.sampled_from(paths))
        parent = header
        for step in path[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(_KEYS))] = draw(_values)
        else:
            parent[path[-1]] = draw(_values)
    buffers = draw(st.sampled_from([buffers, buffers[:-1], buffers + [b"x"], []]))
    return [msgpack.packb(header, use_bin_type=True), *buffers]


@settings(FUZZ, max_examples=500)
@given(frames=_mutated())
def test_mutated_real_messages(frames):
    _decode_or_refuse(frames)


@FUZZ
@given(mtype=st.sampled_from(_TYPES), data=st.data())
def test_byte_flips_of_real_encodings(mtype, data):
    msg = SAMPLES[mtype](data.draw(st.sampled_from([_inline, _by_shm])))
    raw = bytearray(P.encode(msg)[0])
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.just(len(raw)), st.integers(0, len(raw))))
    _decode_or_refuse([bytes(raw[:cut]), *_frames_for(msg)])
