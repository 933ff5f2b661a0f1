"""Triton's extensions as `tritonclient` calls them: statistics, logging, trace settings, and the
infer-request corner cases Triton defines (duplicate outputs, classification, unregistering a
region that is not registered). One daemon serving `digits`, shared by the module."""
from __future__ import annotations

import json
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import Daemon, http_get, orphan_segments, request_json

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def ferry(demo_models, tmp_path_factory):
    d = Daemon(tensor_repo(demo_models, tmp_path_factory, ("digits",))).start()
    yield d
    assert d.stop() == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"


@pytest.fixture(scope="module")
def client(ferry):
    c = th.InferenceServerClient(f"127.0.0.1:{ferry.port}")
    yield c
    c.close()


@pytest.fixture(scope="module")
def images():
    from daemon.demo import digits_split
    _, x_test, _, y_test = digits_split()
    return x_test.astype(np.float32), y_test


def _pixels(x: np.ndarray, binary: bool = True) -> th.InferInput:
    inp = th.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def _post(ferry, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(ferry.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return request_json(req, 10.0)


def _digits_stat(stats: dict) -> dict:
    [entry] = [m for m in stats["model_stats"] if m["name"] == "digits"]
    return entry


# -- statistics ------------------------------------------------------------------------------

def test_statistics_count_every_inference(client, images):
    x, _ = images
    before = _digits_stat(client.get_inference_statistics("digits"))
    assert before["version"] == "1"
    assert set(before["inference_stats"]) >= {"success", "fail", "queue", "compute_input",
                                              "compute_infer", "compute_output", "cache_hit",
                                              "cache_miss"}
    started_ms = int(time.time() * 1000)
    for i in range(5):
        client.infer("digits", [_pixels(x[2 * i:2 * i + 2])])      # 5 requests of 2 rows
    after = _digits_stat(client.get_inference_statistics("digits", "1"))

    def grew(key: str) -> int:
        return after["inference_stats"][key]["count"] - before["inference_stats"][key]["count"]
    assert after["inference_count"] - before["inference_count"] == 10
    assert grew("success") == 5 and grew("queue") == 5 and grew("compute_infer") == 5
    assert grew("fail") == 0
    assert 1 <= after["execution_count"] - before["execution_count"] <= 5
    assert after["inference_stats"]["success"]["ns"] > before["inference_stats"]["success"]["ns"]
    assert after["last_inference"] >= started_ms
    sizes = {b["batch_size"]: b for b in after["batch_stats"]}
    assert 2 in sizes and sizes[2]["compute_infer"]["count"] >= 1
    assert sum(b["compute_infer"]["count"] for b in after["batch_stats"]) \
        == after["execution_count"]


def test_statistics_agree_whichever_worker_answers(ferry, client, images):
    """Workers are separate processes: every one reports the engines' counts, not its own."""
    x, _ = images
    client.infer("digits", [_pixels(x[:1])])
    seen = set()
    for _ in range(12):          # a fresh connection each time: SO_REUSEPORT spreads them
        code, body = http_get(ferry.url + "/v2/models/digits/stats")
        assert code == 200
        seen.add(_digits_stat(body)["inference_count"])
    assert len(seen) == 1 and seen.pop() > 0


def test_statistics_of_all_models_is_not_a_model_named_stats(client):
    everything = client.get_inference_statistics()
    assert [m["name"] for m in everything["model_stats"]] == ["digits"]


def test_failed_requests_are_counted(client, images):
    x, _ = images
    before = _digits_stat(client.get_inference_statistics("digits"))
    with pytest.raises(InferenceServerException):
        client.infer("digits", [_pixels(x[:1, :32].copy())])       # 32 pixels, not 64
    after = _digits_stat(client.get_inference_statistics("digits"))
    fails = [s["inference_stats"]["fail"]["count"] for s in (before, after)]
    assert fails[1] == fails[0] + 1
    assert after["inference_count"] == before["inference_count"]


@pytest.mark.parametrize("path, status, code", [
    ("/v2/models/nope/stats", 404, "model_not_found"),
    ("/v2/models/digits/versions/7/stats", 404, "model_not_found"),
    ("/v2/models/digits/versions/x/stats", 400, "invalid_input"),
])
def test_statistics_of_unknown_models_are_clear_errors(ferry, path, status, code):
    got, body = http_get(ferry.url + path)
    assert (got, body["code"]) == (status, code)
    assert isinstance(body["error"], str) and body["error"]


# -- server metadata, logging and trace settings ---------------------------------------------

def test_server_metadata_lists_only_what_ferry_implements(client):
    ext = set(client.get_server_metadata()["extensions"])
    assert {"statistics", "logging", "classification", "binary_tensor_data",
            "system_shared_memory", "model_repository", "model_configuration"} <= ext
    # no tracing, no sequence batching, no CUDA shared memory
    assert not ext & {"trace", "sequence", "cuda_shared_memory", "schedule_policy"}


def _wait_for_line(ferry, text: str, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in ferry.log():
            return True
        time.sleep(0.05)
    return False


def test_log_verbose_level_changes_what_is_logged(ferry, client, images):
    x, _ = images
    settings = client.get_log_settings()
    assert settings == {"log_file": "", "log_info": True, "log_warnings": True,
                        "log_errors": True, "log_verbose_level": 0,
                        "log_format": settings["log_format"]}
    try:
        loud = client.update_log_settings({"log_verbose_level": 1})
        assert loud["log_verbose_level"] == 1 and loud["log_info"] is True
        # another connection (maybe another worker) reads the daemon-wide setting
        assert http_get(ferry.url + "/v2/logging")[1]["log_verbose_level"] == 1
        client.infer("digits", [_pixels(x[:1])], headers={"X-Request-ID": "loud-req-1"})
        assert _wait_for_line(ferry, "loud-req-1"), "no debug line at log_verbose_level 1"
        quiet = client.update_log_settings({"log_verbose_level": 0, "log_info": False})
        assert (quiet["log_info"], quiet["log_warnings"]) == (False, True)
        # the same connection, the worker that applied it before answering
        client.infer("digits", [_pixels(x[:1])], headers={"X-Request-ID": "quiet-req-1"})
        assert "quiet-req-1" not in ferry.log()
    finally:
        client.update_log_settings({"log_verbose_level": 0, "log_info": True})
    assert client.get_log_settings()["log_info"] is True


@pytest.mark.parametrize("body, status, code", [
    ({"log_file": "/tmp/triton.log"}, 400, "log_setting_unsupported"),
    ({"log_errors": False}, 400, "log_setting_unsupported"),
    ({"log_warnings": False}, 400, "log_setting_unsupported"),      # info still on
    ({"log_format": "ISO8601"}, 400, "log_setting_unsupported"),
    ({"log_verbose_level": -1}, 400, "invalid_log_setting"),
    ({"log_verbose_level": True}, 400, "invalid_log_setting"),
    ({"log_info": "yes"}, 400, "invalid_log_setting"),
    ({"log_colour": True}, 400, "invalid_log_setting"),
])
def test_unsupported_log_settings_are_refused(ferry, body, status, code):
    got, answer = _post(ferry, "/v2/logging", body)
    assert (got, answer["code"]) == (status, code), answer
    assert http_get(ferry.url + "/v2/logging")[1]["log_verbose_level"] == 0    # unchanged


def test_logging_body_must_be_an_object(ferry):
    req = urllib.request.Request(ferry.url + "/v2/logging", data=b"[1]",
                                 headers={"Content-Type": "application/json"})
    assert request_json(req, 5.0)[0] == 400


def test_trace_settings_read_as_off_and_refuse_enabling(ferry, client):
    assert client.get_trace_settings()["trace_level"] == ["OFF"]
    assert client.get_trace_settings(model_name="digits")["trace_level"] == ["OFF"]
    assert client.update_trace_settings(settings={"trace_level": ["OFF"]})["trace_level"] \
        == ["OFF"]
    for path in ("/v2/trace/setting", "/v2/models/digits/trace/setting"):
        got, body = _post(ferry, path, {"trace_level": ["TIMESTAMPS"]})
        assert (got, body["code"]) == (400, "trace_unsupported")
        got, body = _post(ferry, path, {"trace_rate": "5"})
        assert (got, body["code"]) == (400, "trace_unsupported")
        got, body = _post(ferry, path, {"tracing": "on"})
        assert (got, body["code"]) == (400, "invalid_trace_setting")
    assert http_get(ferry.url + "/v2/models/nope/trace/setting")[0] == 404


# -- infer-request corner cases Triton defines -------------------------------------------------

def test_unregistering_an_unknown_region_succeeds_as_in_triton(ferry, client):
    client.unregister_system_shared_memory("never-registered")       # raises on a 4xx
    got, body = _post(ferry, "/v2/systemsharedmemory/region/never-registered/unregister", {})
    assert (got, body) == (200, {})
    assert client.get_system_shared_memory_status() == []


def test_duplicate_output_names_are_refused(client, images):
    x, _ = images
    outs = [th.InferRequestedOutput("probabilities"), th.InferRequestedOutput("probabilities")]
    with pytest.raises(InferenceServerException) as err:
        client.infer("digits", [_pixels(x[:1])], outputs=outs)
    assert err.value.status() == "400" and "twice" in err.value.message()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_classification_answers_top_k_labels(client, images, binary):
    x, _ = images
    out = th.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)
    res = client.infer("digits", [_pixels(x[:4], binary)], outputs=[out])
    assert res.get_output("probabilities")["datatype"] == "BYTES"
    classes = res.as_numpy("probabilities")
    assert classes.shape == (4, 3)
    scores = client.infer("digits", [_pixels(x[:4])]).as_numpy("probabilities")
    for row, s in zip(classes, scores):
        parsed = [c.decode() if isinstance(c, bytes) else str(c) for c in row]
        fields = [p.split(":") for p in parsed]
        # score:index:label, best first; digits' labels are the digits themselves
        assert [int(f[1]) for f in fields] == list(np.argsort(-s, kind="stable")[:3])
        assert all(f[2] == f[1] for f in fields)
        assert float(fields[0][0]) == pytest.approx(float(s.max()), abs=1e-6)


@pytest.mark.parametrize("params, code", [
    ({"classification": -1}, "invalid_classification"),
    ({"classification": "3"}, "invalid_classification"),
    ({"classification": True}, "invalid_classification"),
    ({"classification": 2, "shared_memory_region": "r", "shared_memory_byte_size": 8},
     "invalid_classification"),
])
def test_bad_classification_parameters_are_clear_400s(ferry, params, code):
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                        "data": [0.0] * 64}],
            "outputs": [{"name": "probabilities", "parameters": params}]}
    got, answer = _post(ferry, "/v2/models/digits/infer", body)
    assert (got, answer["code"]) == (400, code), answer
