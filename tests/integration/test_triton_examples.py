"""Triton's own example programs (client/src/python/examples, kept verbatim under
triton_examples/) run as subprocesses against `ferry serve` holding Triton's demo models, built
with onnx (tests/integration/triton_models.py). Each must exit 0.

Two programs cannot be pointed at Ferry by their flags alone, so they run through `_SHIM`, which
changes only the client library's view, never the program: memory_growth_test.py has no `-u`
and dials localhost:8000 (the shim rewrites that default to the test daemon), and
simple_http_health_metadata.py asserts the server's name is "triton" (Ferry answers "ferry";
the shim relabels exactly that field, after checking it). Both also run bare, to show the only
difference is that one.

The module's daemon runs in control mode "explicit" (the model-control example loads and
unloads); the KServe error forms these programs reveal each get a direct test below.
"""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.integration.daemon_proc import Daemon, http_get, orphan_segments, request_json
from tests.integration.triton_models import build_repository

pytestmark = pytest.mark.timeout(60)
EXAMPLES = Path(__file__).parent / "triton_examples"
EXPLICIT = '[repository]\ncontrol_mode = "explicit"\n'

_SHIM = """
import runpy, sys
import tritonclient.http as th
url, program = sys.argv[1], sys.argv[2]
init = th.InferenceServerClient.__init__
def __init__(self, *a, **k):
    if k.get("url") == "localhost:8000":
        k["url"] = url
    init(self, *a, **k)
th.InferenceServerClient.__init__ = __init__
meta = th.InferenceServerClient.get_server_metadata
def get_server_metadata(self, *a, **k):
    m = meta(self, *a, **k)
    assert m["name"] == "ferry", m
    return {**m, "name": "triton"}
th.InferenceServerClient.get_server_metadata = get_server_metadata
sys.argv = [program, *sys.argv[3:]]
runpy.run_path(program, run_name="__main__")
"""


@pytest.fixture(scope="module")
def ferry(tmp_path_factory):
    repo = build_repository(tmp_path_factory.mktemp("triton-repo"))
    d = Daemon(repo, workers=2, extra_config=EXPLICIT).start()
    yield d
    assert d.stop() == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"


def _run(ferry: Daemon, program: str, *args: str, shim: bool = False,
         timeout: float = 45.0) -> subprocess.CompletedProcess:
    path = str(EXAMPLES / program)
    url = f"127.0.0.1:{ferry.port}"
    argv = [sys.executable, "-c", _SHIM, url, path, *args] if shim else \
        [sys.executable, path, "-u", url, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess, ferry: Daemon) -> None:
    assert proc.returncode == 0, (f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                                  f"stderr:\n{proc.stderr[-3000:]}\nlog:\n{ferry.log()[-2000:]}")


@pytest.mark.parametrize("program", [
    "simple_http_infer_client.py", "simple_http_aio_infer_client.py",
    "simple_http_async_infer_client.py", "simple_http_shm_client.py",
    "simple_http_string_infer_client.py", "simple_http_shm_string_client.py",
    "reuse_infer_objects_client.py",
])
def test_example_program_passes_unchanged(ferry, program):
    _ok(_run(ferry, program), ferry)


def test_model_control_example_passes_unchanged(ferry):
    proc = _run(ferry, "simple_http_model_control.py")
    _ok(proc, ferry)
    assert "PASS: model control" in proc.stdout
    # it leaves `simple` unloaded; the other examples need it back, at its own config
    assert _post(ferry, "/v2/repository/models/simple/load", {})[0] == 200


def test_memory_growth_test_passes(ferry):
    _ok(_run(ferry, "memory_growth_test.py", "-r", "20", shim=True), ferry)


def test_health_metadata_differs_only_in_the_server_name(ferry):
    bare = _run(ferry, "simple_http_health_metadata.py")
    assert bare.returncode == 1 and bare.stdout.strip() == "FAILED : get_server_metadata", \
        bare.stdout + bare.stderr
    _ok(_run(ferry, "simple_http_health_metadata.py", "-u", f"127.0.0.1:{ferry.port}",
             shim=True), ferry)


# -- the forms those programs use, and their bad variants, directly ----------------------------

def _post(ferry: Daemon, path: str, body: dict | bytes,
          headers: dict[str, str] | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(ferry.url + path, data=data,
                                 headers=headers or {"Content-Type": "application/json"})
    return request_json(req, 15.0)


def _raw(ferry: Daemon, path: str, body: bytes) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(ferry.url + path, data=body,
                                 headers={"Inference-Header-Content-Length": "0"})
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def _strings(name: str, values: list[str], shape: list[int]) -> dict:
    return {"name": name, "datatype": "BYTES", "shape": shape, "data": values}


def test_bytes_json_in_and_out(ferry):
    body = {"inputs": [_strings("INPUT0", [str(i) for i in range(16)], [1, 16]),
                       _strings("INPUT1", ["5"] * 16, [1, 16])]}
    code, out = _post(ferry, "/v2/models/simple_string/infer", body)
    assert code == 200, out
    sums = {o["name"]: o for o in out["outputs"]}
    assert sums["OUTPUT0"]["datatype"] == "BYTES" and sums["OUTPUT0"]["shape"] == [1, 16]
    assert sums["OUTPUT0"]["data"] == [str(i + 5) for i in range(16)]
    assert sums["OUTPUT1"]["data"] == [str(i - 5) for i in range(16)]


def test_bytes_binary_form_round_trips(ferry):
    import tritonclient.http as th
    c = th.InferenceServerClient(f"127.0.0.1:{ferry.port}")
    try:
        data = np.array([["é\x00".encode(), b""] * 8], dtype=object)     # nulls, empty
        inp = th.InferInput("INPUT0", [1, 16], "BYTES")
        inp.set_data_from_numpy(data, binary_data=True)
        res = c.infer("simple_identity", [inp],
                      outputs=[th.InferRequestedOutput("OUTPUT0", binary_data=True)])
    finally:
        c.close()
    assert res.as_numpy("OUTPUT0").tolist() == data.tolist()


def test_bytes_not_utf8_is_a_clear_400_for_an_onnx_string_model(ferry):
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException
    c = th.InferenceServerClient(f"127.0.0.1:{ferry.port}")
    inp = th.InferInput("INPUT0", [1, 16], "BYTES")
    inp.set_data_from_numpy(np.array([[b"\xff"] * 16], dtype=object), binary_data=True)
    try:
        with pytest.raises(InferenceServerException, match="not valid UTF-8") as info:
            c.infer("simple_identity", [inp])
    finally:
        c.close()
    assert info.value.status() == "400"


@pytest.mark.parametrize("inputs, code", [
    ([_strings("INPUT0", ["1"] * 15, [1, 16]), _strings("INPUT1", ["1"] * 16, [1, 16])],
     "invalid_shape"),
    ([{"name": "INPUT0", "datatype": "BYTES", "shape": [1, 16], "data": [1] * 16},
      _strings("INPUT1", ["1"] * 16, [1, 16])], "invalid_data"),
    ([_strings("INPUT0", ["x"] * 16, [1, 16]), _strings("INPUT1", ["1"] * 16, [1, 16])],
     "model_rejected_input"),
    ([{"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
      _strings("INPUT1", ["1"] * 16, [1, 16])], "invalid_dtype"),
])
def test_bad_bytes_json_is_a_4xx(ferry, inputs, code):
    status, body = _post(ferry, "/v2/models/simple_string/infer", {"inputs": inputs})
    assert 400 <= status < 500 and body["code"] == code, body


def _binary_request(head: dict, tail: bytes) -> tuple[bytes, dict[str, str]]:
    head_bytes = json.dumps(head).encode()
    return head_bytes + tail, {"Inference-Header-Content-Length": str(len(head_bytes)),
                               "Content-Type": "application/octet-stream"}


@pytest.mark.parametrize("tail, size, code", [
    (b"\x05\x00\x00\x00ab", 6, "invalid_data"),             # element longer than the data
    (b"\x01\x00\x00\x001" * 16 + b"xx", 82, "invalid_data"),  # bytes past the 16 elements
    (b"\x01\x00\x00\x001" * 15, 75, "invalid_data"),          # 15 elements for 16
    (b"\x01\x00\x00\x001" * 16, -1, "invalid_shape"),
])
def test_bad_bytes_binary_is_a_400(ferry, tail, size, code):
    one = b"\x01\x00\x00\x001" * 16
    head = {"inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [1, 16],
                        "parameters": {"binary_data_size": size}},
                       {"name": "INPUT1", "datatype": "BYTES", "shape": [1, 16],
                        "parameters": {"binary_data_size": len(one)}}]}
    body, headers = _binary_request(head, tail + one)
    status, err = _post(ferry, "/v2/models/simple_string/infer", body, headers)
    assert status == 400 and err["code"] == code, err


@pytest.mark.parametrize("params", [{"sequence_id": 7}, {"sequence_start": True},
                                    {"sequence_id": "corr", "sequence_end": True}])
def test_sequence_parameters_are_a_clear_400(ferry, params):
    body = {"inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [1, 16],
                        "data": [1] * 16}], "parameters": params}
    status, err = _post(ferry, "/v2/models/custom_identity_int32/infer", body)
    assert status == 400 and err["code"] == "sequence_unsupported", err


def test_raw_binary_request(ferry):
    data = np.arange(16, dtype=np.int32)
    status, body, headers = _raw(ferry, "/v2/models/custom_identity_int32/infer",
                                 data.tobytes())
    assert status == 200, body
    n = int(headers["Inference-Header-Content-Length"])
    head = json.loads(body[:n])
    [out] = head["outputs"]
    assert out["shape"] == [1, 16] and out["parameters"]["binary_data_size"] == 64
    assert np.frombuffer(body[n:], dtype=np.int32).tolist() == data.tolist()


@pytest.mark.parametrize("model, payload, code", [
    ("custom_identity_int32", b"\x00" * 63, "invalid_shape"),
    ("simple", b"\x00" * 128, "raw_request_unsupported"),        # two inputs
    ("nope", b"\x00" * 64, "model_not_found"),
])
def test_bad_raw_binary_request_is_a_4xx(ferry, model, payload, code):
    status, body, _ = _raw(ferry, f"/v2/models/{model}/infer", payload)
    assert 400 <= status < 500 and json.loads(body)["code"] == code, body


def test_config_dims_exclude_the_batch_dim(ferry):
    code, config = http_get(ferry.url + "/v2/models/simple_string/config")
    assert code == 200 and config["max_batch_size"] == 8
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == \
        [("INPUT0", "TYPE_STRING", [16]), ("INPUT1", "TYPE_STRING", [16])]
    code, meta = http_get(ferry.url + "/v2/models/simple_string")
    assert meta["inputs"][0] == {"name": "INPUT0", "datatype": "BYTES", "shape": [-1, 16]}


def test_repository_index_honours_ready(ferry):
    assert _post(ferry, "/v2/repository/models/simple_fp16/unload", {})[0] == 200
    try:
        code, every = _post(ferry, "/v2/repository/index", {})
        assert code == 200 and len(every) == 7
        code, ready = _post(ferry, "/v2/repository/index", {"ready": True})
        assert code == 200 and {r["name"] for r in ready} == \
            {r["name"] for r in every} - {"simple_fp16"}
        assert all(r["state"] == "READY" for r in ready)
    finally:
        assert _post(ferry, "/v2/repository/models/simple_fp16/load", {})[0] == 200


@pytest.mark.parametrize("body, code", [
    ({"ready": "yes"}, "invalid_input"),
    ([], "invalid_json"),
])
def test_bad_repository_index_is_a_400(ferry, body, code):
    status, err = _post(ferry, "/v2/repository/index", body)
    assert status == 400 and err["code"] == code, err


def test_load_with_config_override(ferry):
    path = "/v2/repository/models/simple_fp32/load"
    try:
        code, _ = _post(ferry, path, {"parameters": {"config": '{"max_batch_size": 4}'}})
        assert code == 200
        assert http_get(ferry.url + "/v2/models/simple_fp32/config")[1]["max_batch_size"] == 4
    finally:
        assert _post(ferry, path, {})[0] == 200            # back to model.toml
    assert http_get(ferry.url + "/v2/models/simple_fp32/config")[1]["max_batch_size"] == 8


def test_override_copies_are_private_to_each_load_and_pruned(ferry):
    """Each override load gets its own copy; a failed reload leaves the serving copy as it was,
    and copies no loaded version uses are removed."""
    path, copies = "/v2/repository/models/simple_fp32/load", \
        ferry.state_dir / "model-overrides" / "simple_fp32"
    weights = ferry.repo / "simple_fp32" / "1" / "model.onnx"

    def tomls() -> list[str]:
        return [(c / "model.toml").read_text() for c in sorted(copies.iterdir())]

    original = weights.read_bytes()
    try:
        assert _post(ferry, path, {"parameters": {"config": '{"max_batch_size": 4}'}})[0] == 200
        (serving,) = copies.iterdir()
        assert "max_batch_size = 4" in tomls()[0]
        weights.write_bytes(b"not an onnx model")        # the next load fails in the engine
        code, err = _post(ferry, path, {"parameters": {"config": '{"max_batch_size": 2}'}})
        assert 400 <= code < 600 and "failed to load" in err["error"], err
        assert list(copies.iterdir()) == [serving]        # the failed copy is gone, ...
        assert "max_batch_size = 4" in tomls()[0]         # ... the serving one untouched
        assert http_get(ferry.url + "/v2/models/simple_fp32/config")[1]["max_batch_size"] == 4
        weights.write_bytes(original)
        assert _post(ferry, path, {"parameters": {"config": '{"max_batch_size": 2}'}})[0] == 200
        assert [c.name for c in copies.iterdir()] != [serving.name]
        assert len(tomls()) == 1 and "max_batch_size = 2" in tomls()[0]
    finally:
        weights.write_bytes(original)
        assert _post(ferry, path, {})[0] == 200            # back to model.toml
    assert list(copies.iterdir()) == []


@pytest.mark.parametrize("params, code", [
    ({"config": '"parameters": {"config": {{"max_batch_size": "16"}}}'}, "invalid_model_config"),
    ({"config": "[1]"}, "invalid_model_config"),
    ({"config": {"max_batch_size": 4}}, "invalid_model_config"),           # not a string
    ({"config": '{"max_batch_size": "many"}'}, "invalid_model_config"),
    ({"config": '{"max_batch_size": -1}'}, "invalid_model_config"),
    ({"config": '{"name": "other"}'}, "invalid_model_config"),
    ({"config": '{"dynamic_batching": {}}'}, "invalid_model_config"),      # not mapped
    ({"file:1/model.onnx": "AAAA"}, "invalid_model_config"),               # files need config
])
def test_bad_load_override_is_a_4xx_and_keeps_the_model(ferry, params, code):
    status, err = _post(ferry, "/v2/repository/models/simple_fp32/load", {"parameters": params})
    assert 400 <= status < 500 and err["code"] == code, err
    assert "failed to load" in err["error"], err
    assert http_get(ferry.url + "/v2/models/simple_fp32/ready")[0] == 200


def test_bytes_output_region_too_small_is_a_400(ferry):
    import tritonclient.http as th
    import tritonclient.utils.shared_memory as shm
    from tritonclient.utils import InferenceServerException
    c = th.InferenceServerClient(f"127.0.0.1:{ferry.port}")
    key = f"/tx-bytes-{ferry.port}"
    handle = shm.create_shared_memory_region("small_out", key, 8)
    try:
        c.register_system_shared_memory("small_out", key, 8)
        inp = th.InferInput("INPUT0", [1, 16], "BYTES")
        inp.set_data_from_numpy(np.array([[b"abc"] * 16], dtype=object))
        out = th.InferRequestedOutput("OUTPUT0")
        out.set_shared_memory("small_out", 8)
        with pytest.raises(InferenceServerException) as info:
            c.infer("simple_identity", [inp], outputs=[out])
        assert info.value.status() == "400" and "8" in info.value.message()
    finally:
        c.unregister_system_shared_memory("small_out")
        shm.destroy_shared_memory_region(handle)
        c.close()


def test_bytes_input_region_that_does_not_hold_its_elements_is_a_400(ferry):
    import tritonclient.utils.shared_memory as shm
    key = f"/tx-bytes-in-{ferry.port}"
    handle = shm.create_shared_memory_region("bad_in", key, 64)
    try:
        shm.set_shared_memory_region(handle, [np.full(16, 0xFF, dtype=np.uint8)])  # huge length
        assert _post(ferry, "/v2/systemsharedmemory/region/bad_in/register",
                     {"key": key, "offset": 0, "byte_size": 64})[0] == 200
        ref = {"shared_memory_region": "bad_in", "shared_memory_byte_size": 16}
        status, err = _post(ferry, "/v2/models/simple_identity/infer", {"inputs": [
            {"name": "INPUT0", "datatype": "BYTES", "shape": [1, 16], "parameters": ref}]})
        assert status == 400 and err["code"] == "invalid_data", err
    finally:
        _post(ferry, "/v2/systemsharedmemory/region/bad_in/unregister", {})
        shm.destroy_shared_memory_region(handle)


def test_load_and_unload_are_refused_in_control_mode_none(tmp_path_factory):
    repo = build_repository(tmp_path_factory.mktemp("triton-none"), ("custom_identity_int32",))
    d = Daemon(repo, workers=1).start()
    try:
        for verb in ("load", "unload"):
            status, err = _post(d, f"/v2/repository/models/custom_identity_int32/{verb}", {})
            assert status == 400 and err["code"] == "model_control_disabled", err
            assert "not allowed" in err["error"]
        assert http_get(d.url + "/v2/models/custom_identity_int32/ready")[0] == 200
        code, index = _post(d, "/v2/repository/index", {"ready": True})
        assert code == 200 and [r["name"] for r in index] == ["custom_identity_int32"]
    finally:
        assert d.stop() == 0, d.log()[-4000:]


def test_load_from_uploaded_files(ferry, tmp_path):
    """tritonclient's load_model(files=...): the files are the model, the config describes it."""
    import tritonclient.http as th
    from onnx import TensorProto
    from tests.integration.triton_models import MODELS
    build, _ = MODELS["custom_identity_int32"]
    build(TensorProto.INT32, tmp_path / "model.onnx")
    c = th.InferenceServerClient(f"127.0.0.1:{ferry.port}")
    try:
        c.load_model("uploaded_identity",
                     config=json.dumps({"backend": "onnxruntime", "max_batch_size": 4}),
                     files={"file:1/model.onnx": (tmp_path / "model.onnx").read_bytes()})
        assert c.is_model_ready("uploaded_identity")
        assert c.get_model_config("uploaded_identity")["max_batch_size"] == 4
        inp = th.InferInput("INPUT0", [2, 16], "INT32")
        data = np.arange(32, dtype=np.int32).reshape(2, 16)
        inp.set_data_from_numpy(data)
        assert c.infer("uploaded_identity", [inp]).as_numpy("OUTPUT0").tolist() == data.tolist()
        c.unload_model("uploaded_identity")
        assert not c.is_model_ready("uploaded_identity")
    finally:
        c.close()


@pytest.mark.parametrize("params", [
    {"config": "{}", "file:../model.onnx": "AAAA"},
    {"config": "{}", "file:1/../../escape": "AAAA"},
    {"config": "{}", "file:/etc/passwd": "AAAA"},
    {"config": "{}", "file:model.onnx": "AAAA"},                 # outside a version directory
    {"config": "{}", "file:1/model.onnx": "not base64!"},
    {"config": "{}", "file:1/model.onnx": 7},
    {"config": '{"backend": "tensorrt"}', "file:1/model.onnx": "AAAA"},
    {"config": '{"platform": "pytorch_libtorch"}', "file:1/model.onnx": "AAAA"},
])
def test_bad_upload_is_a_400(ferry, params):
    status, err = _post(ferry, "/v2/repository/models/uploaded_bad/load", {"parameters": params})
    assert status == 400 and err["code"] == "invalid_model_config", err
    assert "failed to load" in err["error"]


def test_upload_that_is_not_a_model_fails_to_load_with_a_4xx(ferry):
    params = {"config": "{}", "file:1/model.onnx": "AAAA"}          # three zero bytes
    status, err = _post(ferry, "/v2/repository/models/uploaded_junk/load", {"parameters": params})
    assert 400 <= status < 500 and "failed to load" in err["error"], err
    assert http_get(ferry.url + "/v2/models/uploaded_junk/ready")[0] != 200


@pytest.mark.parametrize("use_shm", [False, True])
def test_bytes_through_the_zmq_client(ferry, use_shm):
    from frontends.client import FerryClient
    c = FerryClient(ferry.zmq_endpoint, timeout_s=30)
    try:
        if use_shm:
            c.register_region(f"zmq-bytes-{ferry.port}", 1 << 16)
        a = np.array([[str(i).encode() for i in range(16)]], dtype=object)
        b = np.array([[b"2"] * 16], dtype=object)
        out = c.infer("simple_string", {"INPUT0": a, "INPUT1": b}, use_shm=use_shm)
    finally:
        c.close()
    assert out["OUTPUT0"].dtype == object and out["OUTPUT0"].shape == (1, 16)
    assert out["OUTPUT0"].tolist() == [[str(i + 2).encode() for i in range(16)]]
    assert out["OUTPUT1"].tolist() == [[str(i - 2).encode() for i in range(16)]]


@pytest.mark.parametrize("body, code", [
    (b"{", "invalid_json"),
    (b"[]", "invalid_json"),
    (b'{"parameters": []}', "invalid_input"),
])
def test_bad_load_body_is_a_400(ferry, body, code):
    status, err = _post(ferry, "/v2/repository/models/simple_fp32/load", body)
    assert status == 400 and err["code"] == code, err


def test_bytes_for_a_numeric_model_is_invalid_dtype(ferry):
    body = {"inputs": [_strings("INPUT0", ["1"] * 16, [1, 16]),
                       _strings("INPUT1", ["1"] * 16, [1, 16])]}
    status, err = _post(ferry, "/v2/models/simple/infer", body)
    assert status == 400 and err["code"] == "invalid_dtype", err


@pytest.mark.parametrize("inputs, code, text", [
    ([{"name": "INPUT0", "datatype": "INT32", "shape": [1, 15], "data": [1] * 15},
      {"name": "INPUT1", "datatype": "INT32", "shape": [1, 15], "data": [1] * 15}],
     "invalid_shape", "unexpected shape for input 'INPUT0' for model 'simple'"),
    ([{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": [1] * 16},
      {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16}],
     "invalid_dtype", "inference input 'INPUT0' data-type is 'float32', but model 'simple' "
                      "expects 'int32'"),
    ([{"name": "INPUT0", "datatype": "INT32", "shape": [1, 16],
       "parameters": {"shared_memory_region": "nowhere", "shared_memory_byte_size": 64}},
      {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16}],
     "shm_unknown_region", "Unable to find system shared memory region: 'nowhere'"),
])
def test_common_errors_are_worded_as_triton_words_them(ferry, inputs, code, text):
    status, err = _post(ferry, "/v2/models/simple/infer", {"inputs": inputs})
    assert status == 400 and err["code"] == code and text in err["error"], err
