"""Bad requests to the KServe routes: a clear 4xx with a stable code, and the daemon keeps serving."""
from __future__ import annotations

import json
import socket

import aiohttp
import asyncio
import numpy as np
import pytest

from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import Daemon, orphan_segments

GOOD = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}


@pytest.fixture(scope="module")
def small_daemon(demo_models, tmp_path_factory):
    d = Daemon(tensor_repo(demo_models, tmp_path_factory, ("digits",)), workers=1,
               server_extra="max_body_mb = 1").start()
    yield d
    assert d.stop() == 0
    assert not orphan_segments()


async def _post(url: str, data: bytes, headers: dict | None = None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=data, headers=headers or
                          {"Content-Type": "application/json"}) as r:
            return r.status, await r.json(content_type=None)


def post(url: str, data: bytes, headers: dict | None = None) -> tuple[int, dict]:
    return asyncio.run(_post(url, data, headers))


def _binary_body(arr: np.ndarray, declared: int | None = None) -> tuple[bytes, dict]:
    head = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32",
                                   "shape": list(arr.shape),
                                   "parameters": {"binary_data_size": declared or arr.nbytes}}]
                       }).encode()
    return head + arr.tobytes(), {"Inference-Header-Content-Length": str(len(head)),
                                  "Content-Type": "application/octet-stream"}


CASES = {
    "malformed_json": (b'{"inputs": [', None, 400, "invalid_json"),
    "not_an_object": (b'[1, 2]', None, 400, "invalid_json"),
    "no_inputs": (b'{"inputs": []}', None, 400, "invalid_input"),
    "wrong_dtype": (json.dumps({"inputs": [{"name": "pixels", "datatype": "INT64",
                                            "shape": [1, 64], "data": [0] * 64}]}).encode(),
                    None, 400, "invalid_dtype"),
    "unknown_datatype": (json.dumps({"inputs": [{"name": "pixels", "datatype": "FP128",
                                                 "shape": [1, 64], "data": [0] * 64}]}).encode(),
                         None, 400, "invalid_dtype"),
    "wrong_shape": (json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32",
                                            "shape": [1, 63], "data": [0] * 63}]}).encode(),
                    None, 400, "invalid_shape"),
    "data_count_mismatch": (json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32",
                                                    "shape": [1, 64], "data": [0] * 3}]}).encode(),
                            None, 400, "invalid_shape"),
    "non_numeric_data": (json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32",
                                                 "shape": [1, 2], "data": ["a", "b"]}]}).encode(),
                         None, 400, "invalid_data"),
    "unknown_input": (json.dumps({"inputs": [{"name": "nope", "datatype": "FP32",
                                              "shape": [1, 64], "data": [0] * 64}]}).encode(),
                      None, 400, "unknown_input"),
    "unregistered_region": (json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32",
                                                    "shape": [1, 64], "parameters": {
                                                        "shared_memory_region": "ghost",
                                                        "shared_memory_byte_size": 256}}]}).encode(),
                            None, 400, "shm_unknown_region"),
    "multipart": (b"--x\r\n\r\n--x--", {"Content-Type": "multipart/form-data; boundary=x"},
                  415, "unsupported_media_type"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_request_gets_a_stable_code(small_daemon, case):
    body, headers, status, code = CASES[case]
    got, err = post(small_daemon.url + "/v2/models/digits/infer", body, headers)
    assert got == status, err
    assert err["code"] == code and err["message"] and err["request_id"]
    assert post(small_daemon.url + "/v2/models/digits/infer", json.dumps(GOOD).encode())[0] == 200


def test_unknown_model_and_version(small_daemon):
    status, err = post(small_daemon.url + "/v2/models/nope/infer", json.dumps(GOOD).encode())
    assert status == 404 and err["code"] == "model_not_found"
    status, err = post(small_daemon.url + "/v2/models/digits/versions/7/infer",
                       json.dumps(GOOD).encode())
    assert status == 404 and err["code"] == "model_not_found"
    status, err = post(small_daemon.url + "/v2/models/digits/versions/x1/infer",
                       json.dumps(GOOD).encode())
    assert status == 400


def test_truncated_binary_body(small_daemon):
    arr = np.zeros((1, 64), np.float32)
    body, headers = _binary_body(arr)
    status, err = post(small_daemon.url + "/v2/models/digits/infer", body[:-10], headers)
    assert status == 400 and err["code"] == "truncated_body"
    headers["Inference-Header-Content-Length"] = str(len(body) + 5)
    status, err = post(small_daemon.url + "/v2/models/digits/infer", body, headers)
    assert status == 400 and err["code"] == "truncated_body"
    body, headers = _binary_body(arr)
    status, err = post(small_daemon.url + "/v2/models/digits/infer", body + b"extra", headers)
    assert status == 400 and err["code"] == "invalid_body"


def test_binary_request_and_response(small_daemon):
    arr = np.arange(64, dtype=np.float32).reshape(1, 64) % 16
    body, headers = _binary_body(arr)
    head = json.loads(body[:int(headers["Inference-Header-Content-Length"])])
    head["parameters"] = {"binary_data_output": True}
    head_b = json.dumps(head).encode()
    headers["Inference-Header-Content-Length"] = str(len(head_b))

    async def go() -> tuple[bytes, dict]:
        async with aiohttp.ClientSession() as s:
            async with s.post(small_daemon.url + "/v2/models/digits/infer",
                              data=head_b + arr.tobytes(), headers=headers) as r:
                assert r.status == 200
                return await r.read(), dict(r.headers)
    raw, resp_headers = asyncio.run(go())
    n = int(resp_headers["Inference-Header-Content-Length"])
    meta = json.loads(raw[:n])
    out = np.frombuffer(raw[n:], dtype=np.float32).reshape(meta["outputs"][0]["shape"])
    assert out.shape == (1, 10) and abs(float(out.sum()) - 1.0) < 1e-4


def test_oversized_body_is_413(small_daemon):
    big = b'{"inputs": [' + b" " * (2 << 20) + b"]}"
    status, err = post(small_daemon.url + "/v2/models/digits/infer", big)
    assert status == 413 and err["code"] == "payload_too_large"
    assert post(small_daemon.url + "/v2/models/digits/infer", json.dumps(GOOD).encode())[0] == 200


def test_unknown_route_and_method(small_daemon):
    async def go() -> list[tuple[int, dict]]:
        async with aiohttp.ClientSession() as s:
            out = []
            for method, path in (("GET", "/v2/nothing"), ("DELETE", "/v2/models/digits/infer")):
                async with s.request(method, small_daemon.url + path) as r:
                    out.append((r.status, await r.json(content_type=None)))
            return out
    (s1, e1), (s2, e2) = asyncio.run(go())
    assert s1 == 404 and e1["code"] == "route_not_found"
    assert s2 == 405 and e2["code"] == "method_not_allowed"


def test_raw_garbage_on_the_socket_does_not_hurt(small_daemon):
    with socket.create_connection(("127.0.0.1", small_daemon.port), timeout=5) as s:
        s.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        s.recv(1024)
    assert post(small_daemon.url + "/v2/models/digits/infer", json.dumps(GOOD).encode())[0] == 200
