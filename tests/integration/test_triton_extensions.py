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
    grew = lambda key: after["inference_stats"][key]["count"] - before["inference_stats"][key]["count"]  # noqa: E731
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
    assert after["inference_stats"]["fail"]["count"] == before["inference_stats"]["fail"]["count"] + 1
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


def test_server_metadata_lists_statistics(client):
    assert "statistics" in client.get_server_metadata()["extensions"]
