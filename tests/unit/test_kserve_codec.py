"""KServe v2 tensor encoding: JSON tensors, the binary-data extension and shared-memory
references in; JSON, binary or shm outputs back. Every malformed request is an InvalidInput
with a stable code, never another exception (a hypothesis fuzz holds parse_infer to that)."""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon import protocol as P
from daemon.errors import InvalidInput
from frontends.http.kserve_codec import (KSERVE_TO_NUMPY, OutputRequest, ParsedInfer,
                                         encode_outputs, parse_infer)

pytestmark = pytest.mark.timeout(60)


def _body(req: Any, *chunks: bytes) -> tuple[bytes, str | None]:
    head = json.dumps(req).encode()
    if not chunks:
        return head, None
    return head + b"".join(chunks), str(len(head))


def _parse(req: Any, *chunks: bytes) -> ParsedInfer:
    return parse_infer(*_body(req, *chunks))


def _inp(name: str = "x", datatype: str = "FP32", shape: Any = (2, 2), **extra: Any) -> dict:
    item = {"name": name, "datatype": datatype, "shape": list(shape)}
    item.update(extra)
    return item


# ---- inputs -----------------------------------------------------------------------------------

def test_json_tensors_of_every_datatype():
    inputs = []
    for kdt, npdt in KSERVE_TO_NUMPY.items():
        data = [True, False] if kdt == "BOOL" else ["1", "2"] if kdt == "BYTES" else [1, 2]
        inputs.append(_inp(kdt.lower(), kdt, [2], data=data))
    parsed = _parse({"inputs": inputs})
    assert list(parsed.arrays) == [k.lower() for k in KSERVE_TO_NUMPY]
    for kdt, npdt in KSERVE_TO_NUMPY.items():
        arr = parsed.arrays[kdt.lower()]
        assert arr.dtype == np.dtype(object if kdt == "BYTES" else npdt) and arr.shape == (2,)
    assert parsed.arrays["fp32"].tolist() == [1.0, 2.0]
    assert parsed.arrays["bytes"].tolist() == [b"1", b"2"]
    assert parsed.region_refs == [] and parsed.outputs is None
    assert parsed.binary_default is False and parsed.id is None and parsed.timeout_ms == 0


def test_json_data_may_be_flat_or_nested_and_is_row_major():
    flat = _parse({"inputs": [_inp(data=[1, 2, 3, 4])]}).arrays["x"]
    nested = _parse({"inputs": [_inp(data=[[1, 2], [3, 4]])]}).arrays["x"]
    np.testing.assert_array_equal(flat, [[1, 2], [3, 4]])
    np.testing.assert_array_equal(nested, flat)


def test_scalar_and_empty_shapes():
    parsed = _parse({"inputs": [_inp("s", "INT32", [], data=[5]),
                                _inp("e", "FP32", [0, 3], data=[])]})
    assert parsed.arrays["s"].shape == () and parsed.arrays["s"] == 5
    assert parsed.arrays["e"].shape == (0, 3)


def test_request_fields():
    parsed = _parse({"id": "abc", "inputs": [_inp(data=[0] * 4)],
                     "parameters": {"timeout": 2_500_000, "binary_data_output": True,
                                    "custom": "kept"}})
    assert parsed.id == "abc" and parsed.timeout_ms == 2500 and parsed.binary_default is True
    assert parsed.parameters["custom"] == "kept"


def test_binary_inputs_take_their_bytes_in_order():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([7, -8], dtype=np.int64)
    c = np.array([True, False, True])
    req = {"inputs": [
        _inp("a", "FP32", [2, 3], parameters={"binary_data_size": 24}),
        _inp("j", "INT8", [2], data=[1, 2]),            # JSON input between binary ones
        _inp("b", "INT64", [2], parameters={"binary_data_size": 16}),
        _inp("c", "BOOL", [3], parameters={"binary_data_size": 3}),
        _inp("z", "FP16", [0], parameters={"binary_data_size": 0}),
    ]}
    parsed = _parse(req, a.tobytes(), b.tobytes(), c.tobytes())
    np.testing.assert_array_equal(parsed.arrays["a"], a)
    np.testing.assert_array_equal(parsed.arrays["b"], b)
    np.testing.assert_array_equal(parsed.arrays["c"], c)
    assert parsed.arrays["j"].tolist() == [1, 2] and parsed.arrays["z"].shape == (0,)
    assert list(parsed.arrays) == ["a", "j", "b", "c", "z"]


def test_binary_input_is_a_view_of_the_body():
    a = np.arange(4, dtype=np.int32)
    body, hlen = _body({"inputs": [_inp("a", "INT32", [4],
                                        parameters={"binary_data_size": 16})]}, a.tobytes())
    arr = parse_infer(body, hlen).arrays["a"]
    assert np.shares_memory(arr, np.frombuffer(body, np.uint8))


def test_header_length_equal_to_the_body_means_no_binary_part():
    body, _ = _body({"inputs": [_inp(data=[1, 2, 3, 4])]})
    assert parse_infer(body, str(len(body))).arrays["x"].shape == (2, 2)


def test_shared_memory_inputs_become_region_references():
    parsed = _parse({"inputs": [
        _inp("a", "FP32", [2, 2], parameters={"shared_memory_region": "in0",
                                              "shared_memory_byte_size": 16,
                                              "shared_memory_offset": 64}),
        _inp("b", "UINT8", [3], parameters={"shared_memory_region": "in1",
                                            "shared_memory_byte_size": 3}),
        _inp("c", "INT8", [1], data=[1])]})
    assert parsed.region_refs == [
        P.TensorRef("a", "float32", (2, 2), shm=P.ShmLoc("in0", 64, 16)),
        P.TensorRef("b", "uint8", (3,), shm=P.ShmLoc("in1", 0, 3))]
    assert list(parsed.arrays) == ["c"]


def test_outputs_binary_flags_and_shared_memory():
    parsed = _parse({"inputs": [_inp(data=[0] * 4)],
                     "parameters": {"binary_data_output": True},
                     "outputs": [{"name": "p"},
                                 {"name": "q", "parameters": {"binary_data": False}},
                                 {"name": "r", "parameters": {"shared_memory_region": "out0",
                                                              "shared_memory_byte_size": 64,
                                                              "shared_memory_offset": 8}}]})
    assert parsed.outputs == [OutputRequest("p", True), OutputRequest("q", False),
                              OutputRequest("r", True, P.ShmLoc("out0", 8, 64))]
    parsed = _parse({"inputs": [_inp(data=[0] * 4)],
                     "outputs": [{"name": "p"},
                                 {"name": "q", "parameters": {"binary_data": True}}]})
    assert [o.binary for o in parsed.outputs] == [False, True]


# ---- refusals ---------------------------------------------------------------------------------

def _ok() -> dict:
    return _inp(data=[1, 2, 3, 4])


def _with(**params: Any) -> dict:
    return {"inputs": [_ok()], "parameters": params}


BAD_JSON: dict[str, tuple[Any, str, str | None]] = {
    # case: (request, code, param)
    "inputs missing": ({}, "invalid_input", "inputs"),
    "inputs empty": ({"inputs": []}, "invalid_input", "inputs"),
    "inputs map": ({"inputs": {"x": 1}}, "invalid_input", "inputs"),
    "input not object": ({"inputs": [5]}, "invalid_input", "inputs"),
    "input without name": ({"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]},
                           "invalid_input", "inputs"),
    "input name int": ({"inputs": [_inp(name=3, data=[1] * 4)]}, "invalid_input", "inputs"),
    "input twice": ({"inputs": [_ok(), _ok()]}, "invalid_input", "x"),
    "input twice via shm": ({"inputs": [_ok(), _inp(parameters={
        "shared_memory_region": "r", "shared_memory_byte_size": 16})]}, "invalid_input", "x"),
    "no data": ({"inputs": [_inp()]}, "invalid_input", "x"),
    "input parameters list": ({"inputs": [_inp(data=[1] * 4, parameters=[1])]},
                              "invalid_input", None),
    "request parameters list": ({"inputs": [_ok()], "parameters": [1]}, "invalid_input", None),
    "request parameters null": ({"inputs": [_ok()], "parameters": None}, "invalid_input", None),
    "BYTES numbers": ({"inputs": [_inp(datatype="BYTES", data=[1] * 4)]},
                      "invalid_data", "x"),
    "datatype unknown": ({"inputs": [_inp(datatype="FP8", data=[1] * 4)]}, "invalid_dtype", "x"),
    "datatype lowercase": ({"inputs": [_inp(datatype="fp32", data=[1] * 4)]},
                           "invalid_dtype", "x"),
    "datatype missing": ({"inputs": [{"name": "x", "shape": [1], "data": [1]}]},
                         "invalid_dtype", "x"),
    "datatype list": ({"inputs": [_inp(datatype=["FP32"], data=[1] * 4)]}, "invalid_dtype", "x"),
    "shape missing": ({"inputs": [{"name": "x", "datatype": "FP32", "data": [1]}]},
                      "invalid_shape", "x"),
    "shape text": ({"inputs": [_inp(shape="22", data=[1] * 4)]}, "invalid_shape", "x"),
    "shape negative": ({"inputs": [_inp(shape=[-1, 4], data=[1] * 4)]}, "invalid_shape", "x"),
    "shape float": ({"inputs": [_inp(shape=[2.0, 2], data=[1] * 4)]}, "invalid_shape", "x"),
    "shape bool": ({"inputs": [_inp(shape=[True, 4], data=[1] * 4)]}, "invalid_shape", "x"),
    "shape rank 17": ({"inputs": [_inp(shape=[1] * 17, data=[1])]}, "invalid_shape", "x"),
    "shape too many elements": ({"inputs": [_inp(shape=[2 ** 16, 2 ** 16, 2], data=[1])]},
                                "invalid_shape", "x"),
    "data too few": ({"inputs": [_inp(data=[1, 2, 3])]}, "invalid_shape", "x"),
    "data too many": ({"inputs": [_inp(data=[[1, 2, 3], [4, 5, 6]])]}, "invalid_shape", "x"),
    "data scalar for vector": ({"inputs": [_inp(data=1)]}, "invalid_shape", "x"),
    "data words": ({"inputs": [_inp(data=["a", "b", "c", "d"])]}, "invalid_data", "x"),
    "data object": ({"inputs": [_inp(data={"a": 1})]}, "invalid_data", "x"),
    "data ragged": ({"inputs": [_inp(data=[[1, 2], [3]])]}, "invalid_data", "x"),
    "data null int": ({"inputs": [_inp(datatype="INT32", data=[None] * 4)]},
                      "invalid_data", "x"),
    "data int8 overflow": ({"inputs": [_inp(datatype="INT8", data=[1000, 1, 2, 3])]},
                           "invalid_data", "x"),
    "data uint8 negative": ({"inputs": [_inp(datatype="UINT8", data=[-1, 1, 2, 3])]},
                            "invalid_data", "x"),
    "data int64 overflow": ({"inputs": [_inp(datatype="INT64", data=[2 ** 64] * 4)]},
                            "invalid_data", "x"),
    "data deeper than numpy": ({"inputs": [_inp(shape=[1], data=json.loads("[" * 70 + "1"
                                                                           + "]" * 70))]},
                               "invalid_data", "x"),
    "binary size mismatch": ({"inputs": [_inp(parameters={"binary_data_size": 15})]},
                             "invalid_shape", "x"),
    "binary size text": ({"inputs": [_inp(parameters={"binary_data_size": "16"})]},
                         "invalid_shape", "x"),
    "binary bytes missing": ({"inputs": [_inp(parameters={"binary_data_size": 16})]},
                             "truncated_body", "x"),
    "shm region int": ({"inputs": [_inp(parameters={"shared_memory_region": 1,
                                                    "shared_memory_byte_size": 16})]},
                       "shm_bad_reference", "x"),
    "shm size missing": ({"inputs": [_inp(parameters={"shared_memory_region": "r"})]},
                         "shm_bad_reference", "x"),
    "shm size text": ({"inputs": [_inp(parameters={"shared_memory_region": "r",
                                                   "shared_memory_byte_size": "16"})]},
                      "shm_bad_reference", "x"),
    "shm size mismatch": ({"inputs": [_inp(parameters={"shared_memory_region": "r",
                                                       "shared_memory_byte_size": 32})]},
                          "shm_bad_reference", "x"),
    "shm offset negative": ({"inputs": [_inp(parameters={"shared_memory_region": "r",
                                                         "shared_memory_byte_size": 16,
                                                         "shared_memory_offset": -8})]},
                            "shm_bad_reference", "x"),
    "shm offset float": ({"inputs": [_inp(parameters={"shared_memory_region": "r",
                                                      "shared_memory_byte_size": 16,
                                                      "shared_memory_offset": 0.5})]},
                         "shm_bad_reference", "x"),
    "outputs map": ({"inputs": [_ok()], "outputs": {"name": "p"}}, "invalid_input", "outputs"),
    "output not object": ({"inputs": [_ok()], "outputs": ["p"]}, "invalid_input", "outputs"),
    "output without name": ({"inputs": [_ok()], "outputs": [{}]}, "invalid_input", "outputs"),
    "output parameters list": ({"inputs": [_ok()], "outputs": [{"name": "p", "parameters": []}]},
                               "invalid_input", None),
    "output binary text": ({"inputs": [_ok()], "outputs": [
        {"name": "p", "parameters": {"binary_data": "yes"}}]}, "invalid_input", "p"),
    "output shm size negative": ({"inputs": [_ok()], "outputs": [
        {"name": "p", "parameters": {"shared_memory_region": "r",
                                     "shared_memory_byte_size": -1}}]},
                                 "shm_bad_reference", "p"),
    "binary output text": (_with(binary_data_output="true"), "invalid_input",
                           "binary_data_output"),
    "binary output int": (_with(binary_data_output=1), "invalid_input", "binary_data_output"),
    "timeout negative": (_with(timeout=-1), "invalid_input", "timeout"),
    "timeout text": (_with(timeout="10"), "invalid_input", "timeout"),
    "timeout float": (_with(timeout=1.5), "invalid_input", "timeout"),
    "id int": ({"id": 5, "inputs": [_ok()]}, "invalid_input", "id"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON))
def test_malformed_request_is_refused_with_its_code(case):
    req, code, param = BAD_JSON[case]
    with pytest.raises(InvalidInput) as err:
        _parse(req)
    assert err.value.code == code and err.value.status == 400
    assert err.value.param == param


BAD_BODY: dict[str, tuple[bytes, str | None, str]] = {
    "not json": (b"inputs please", None, "invalid_json"),
    "empty": (b"", None, "invalid_json"),
    "json list": (b"[1, 2]", None, "invalid_json"),
    "json string": (b'"x"', None, "invalid_json"),
    "not utf-8": (b'{"inputs": "\xff"}', None, "invalid_json"),
    "nested too deep": (b"[" * 100_000, None, "invalid_json"),
    "nested object too deep": (b'{"a":' * 100_000, None, "invalid_json"),
    "header length text": (b"{}", "ten", "invalid_header"),
    "header length float": (b"{}", "1.5", "invalid_header"),
    "header length empty": (b"{}", "", "invalid_header"),
    "header length negative": (b"{}", "-1", "truncated_body"),
    "header length past the body": (b"{}", "3", "truncated_body"),
    "header cuts the json": (b'{"inputs": []}', "5", "invalid_json"),
}


@pytest.mark.parametrize("case", sorted(BAD_BODY))
def test_malformed_body_is_refused_with_its_code(case):
    body, hlen, code = BAD_BODY[case]
    with pytest.raises(InvalidInput) as err:
        parse_infer(body, hlen)
    assert err.value.code == code


def test_binary_body_shorter_than_declared_is_truncated():
    req = {"inputs": [_inp("a", "INT32", [4], parameters={"binary_data_size": 16}),
                      _inp("b", "INT32", [4], parameters={"binary_data_size": 16})]}
    with pytest.raises(InvalidInput) as err:
        _parse(req, b"\0" * 16, b"\0" * 15)
    assert err.value.code == "truncated_body" and err.value.param == "b"


def test_unclaimed_binary_bytes_are_refused():
    req = {"inputs": [_inp("a", "INT32", [4], parameters={"binary_data_size": 16})]}
    with pytest.raises(InvalidInput) as err:
        _parse(req, b"\0" * 17)
    assert err.value.code == "invalid_body"
    with pytest.raises(InvalidInput) as err:
        _parse({"inputs": [_ok()]}, b"\0")
    assert err.value.code == "invalid_body"


# ---- outputs ----------------------------------------------------------------------------------

OUT = {"probs": np.array([[0.25, 0.75]], np.float32), "label": np.array([1], np.int64),
       "mask": np.array([True, False])}


def _parsed(outputs: list[OutputRequest] | None = None, binary_default: bool = False):
    return ParsedInfer(None, {}, [], outputs, binary_default)


def test_outputs_as_json_by_default():
    entries, chunks = encode_outputs(OUT, _parsed(), {})
    assert entries == [
        {"name": "probs", "datatype": "FP32", "shape": [1, 2], "data": [0.25, 0.75]},
        {"name": "label", "datatype": "INT64", "shape": [1], "data": [1]},
        {"name": "mask", "datatype": "BOOL", "shape": [2], "data": [True, False]}]
    assert chunks == []
    json.dumps(entries)                       # plain Python values only


def test_binary_output_for_the_whole_request():
    entries, chunks = encode_outputs(OUT, _parsed(binary_default=True), {})
    assert [e["parameters"] for e in entries] == [{"binary_data_size": 8},
                                                  {"binary_data_size": 8},
                                                  {"binary_data_size": 2}]
    assert all("data" not in e for e in entries)
    assert chunks == [OUT["probs"].tobytes(), OUT["label"].tobytes(), OUT["mask"].tobytes()]


def test_requested_outputs_choose_binary_each_and_filter():
    wanted = [OutputRequest("mask", True), OutputRequest("probs", False)]
    entries, chunks = encode_outputs(OUT, _parsed(wanted, binary_default=True), {})
    assert [e["name"] for e in entries] == ["probs", "mask"]   # in the engine's order
    assert entries[0]["data"] == [0.25, 0.75]
    assert entries[1]["parameters"] == {"binary_data_size": 2}
    assert chunks == [OUT["mask"].tobytes()]


def test_shared_memory_output_carries_only_its_reference():
    wanted = [OutputRequest("probs", True, P.ShmLoc("out0", 64, 8)), OutputRequest("label", True)]
    entries, chunks = encode_outputs(OUT, _parsed(wanted), {"probs": P.ShmLoc("out0", 64, 8)})
    assert entries[0] == {"name": "probs", "datatype": "FP32", "shape": [1, 2],
                          "parameters": {"shared_memory_region": "out0",
                                         "shared_memory_byte_size": 8}}
    assert chunks == [OUT["label"].tobytes()]


def test_binary_output_of_a_strided_array_is_row_major():
    arr = np.arange(12, dtype=np.int32).reshape(3, 4).T
    _, chunks = encode_outputs({"t": arr}, _parsed(binary_default=True), {})
    assert np.frombuffer(chunks[0], np.int32).reshape(4, 3).tolist() == arr.tolist()


def test_binary_outputs_parse_back_as_binary_inputs():
    entries, chunks = encode_outputs(OUT, _parsed(binary_default=True), {})
    parsed = _parse({"inputs": entries}, *chunks)
    for name, arr in OUT.items():
        np.testing.assert_array_equal(parsed.arrays[name], arr)


# ---- fuzz -------------------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70),
              st.floats(allow_nan=False), st.text(max_size=8),
              st.sampled_from(list(KSERVE_TO_NUMPY) + ["BYTES", "name", "data", "shape"])),
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.sampled_from(["name", "datatype", "shape", "data", "parameters",
                                         "inputs", "outputs", "id", "binary_data_size",
                                         "binary_data", "binary_data_output", "timeout",
                                         "shared_memory_region", "shared_memory_byte_size",
                                         "shared_memory_offset"]) | st.text(max_size=5),
                        inner, max_size=5)),
    max_leaves=20)


def _parse_or_refuse(body: bytes, hlen: str | None) -> None:
    try:
        parsed = parse_infer(body, hlen)
    except InvalidInput as exc:
        assert exc.status == 400 and isinstance(exc.code, str)
        return
    for name, arr in parsed.arrays.items():
        assert arr.dtype.name in P.DTYPES and isinstance(name, str)


@FUZZ
@given(body=st.binary(max_size=200),
       hlen=st.one_of(st.none(), st.text(max_size=4), st.integers(-5, 220).map(str)))
def test_fuzz_random_bytes(body, hlen):
    _parse_or_refuse(body, hlen)


@FUZZ
@given(req=_json, tail=st.binary(max_size=40), use_header=st.booleans())
def test_fuzz_random_json(req, tail, use_header):
    head = json.dumps(req).encode()
    _parse_or_refuse(head + tail if use_header else head, str(len(head)) if use_header else None)


_VALID = {"id": "r", "inputs": [
    _inp("a", "FP32", [2], data=[1.5, 2]),
    _inp("b", "INT32", [2], parameters={"binary_data_size": 8}),
    _inp("c", "UINT8", [4], parameters={"shared_memory_region": "in0",
                                        "shared_memory_byte_size": 4})],
    "outputs": [{"name": "p", "parameters": {"binary_data": True}}],
    "parameters": {"binary_data_output": False, "timeout": 1000}}


@st.composite
def _near_valid(draw: st.DrawFn) -> tuple[bytes, str | None]:
    req = json.loads(json.dumps(_VALID))
    for _ in range(draw(st.integers(1, 3))):
        node: Any = req
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node) if isinstance(node, dict)
                                       else list(range(len(node)))))
            if not isinstance(node[key], (dict, list)):
                break
            node = node[key]
        if isinstance(node, dict) and node:
            key = draw(st.sampled_from(sorted(node)))
        elif isinstance(node, list) and node:
            key = draw(st.integers(0, len(node) - 1))
        else:
            continue
        if draw(st.booleans()):
            node[key] = draw(_json)
        else:
            del node[key]
    head = json.dumps(req).encode()
    tail = draw(st.sampled_from([b"\0" * 8, b"\0" * 7, b"\0" * 9, b""]))
    return head + tail, draw(st.sampled_from([str(len(head)), None, str(len(head) + 1)]))


@FUZZ
@given(case=_near_valid())
def test_fuzz_near_valid_requests(case):
    _parse_or_refuse(*case)


def test_duplicate_outputs_and_bad_classification_are_refused():
    from frontends.http.kserve_codec import parse_infer as _parse
    base = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
    for outputs, code in (([{"name": "y"}, {"name": "y"}], "duplicate_output"),
                          ([{"name": "y", "parameters": {"classification": -2}}],
                           "invalid_classification")):
        with pytest.raises(InvalidInput) as err:
            _parse(json.dumps({**base, "outputs": outputs}).encode(), None)
        assert err.value.code == code
    ok = _parse(json.dumps({**base, "outputs": [{"name": "y", "parameters": {
        "classification": 2}}]}).encode(), None)
    assert ok.outputs[0].classification == 2


def test_classification_strings_in_both_forms():
    from frontends.http.kserve_classify import classify_output
    from frontends.http.kserve_codec import encode_outputs, parse_infer as _parse
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], dtype=np.float32)
    classes = classify_output("y", scores, 2, True, ("a", "b", "c"))
    assert classes.tolist() == [[b"0.700000:1:b", b"0.200000:2:c"],
                                [b"0.500000:0:a", b"0.250000:1:b"]]
    assert classify_output("y", scores[0], 5, False, ()).tolist() == [
        b"0.700000:1", b"0.200000:2", b"0.100000:0"]
    for binary in (False, True):
        parsed = _parse(json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1],
                                                "data": [1.0]}], "outputs": [{"name": "y",
                        "parameters": {"classification": 2, "binary_data": binary}}]}).encode(),
                        None)
        entries, chunks = encode_outputs({"y": classes}, parsed, {})
        assert entries[0]["datatype"] == "BYTES" and entries[0]["shape"] == [2, 2]
        if binary:
            assert chunks[0][:4] == (12).to_bytes(4, "little")
            assert chunks[0][4:16] == b"0.700000:1:b"
        else:
            assert entries[0]["data"][0] == "0.700000:1:b"


def test_bytes_outputs_in_json_binary_and_refused_when_not_utf8():
    from frontends.http.kserve_codec import encode_outputs
    from daemon.errors import InvalidInput as _Invalid
    parsed = _parse({"inputs": [_inp(data=[1] * 4)], "outputs": [
        {"name": "text"}, {"name": "raw", "parameters": {"binary_data": True}}]})
    arrays = {"text": np.array([b"a", "é".encode()], dtype=object),
              "raw": np.array([b"\xff", b""], dtype=object)}
    entries, chunks = encode_outputs(arrays, parsed, {})
    assert entries[0] == {"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", "é"]}
    assert entries[1]["parameters"] == {"binary_data_size": 9}
    assert chunks == [b"\x01\x00\x00\x00\xff\x00\x00\x00\x00"]
    bad = _parse({"inputs": [_inp(data=[1] * 4)], "outputs": [{"name": "raw"}]})
    with pytest.raises(_Invalid) as err:
        encode_outputs({"raw": arrays["raw"]}, bad, {})
    assert err.value.code == "output_not_utf8"
