"""Shared-memory boundaries (issue 13.1): a client reference may name only a region registered
through the shared-memory API, never one of Ferry's own arenas; registration refuses symlinks
and non-regular files; the number of registered regions is capped."""
from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from daemon import protocol as P
from daemon.errors import FerryError
from frontends.client import FerryClient
from tests.integration.daemon_proc import ferry_segments, http_get, request_json

X = np.random.default_rng(0).random((2, 64), dtype=np.float32)


def _infer_body(in_params: dict | None = None, out_params: dict | None = None) -> dict:
    inp: dict = {"name": "pixels", "shape": [2, 64], "datatype": "FP32"}
    if in_params is None:
        inp["data"] = X.reshape(-1).tolist()
    else:
        inp["parameters"] = in_params
    out: dict = {"name": "probabilities"}
    if out_params is not None:
        out["parameters"] = out_params
    return {"inputs": [inp], "outputs": [out]}


def _post(daemon, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(daemon.url + path, data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    return request_json(req, timeout=30)


def _internal_arenas() -> list[str]:
    names = sorted(ferry_segments())
    assert any("-eng" in n for n in names) and any("-http" in n for n in names), names
    return names


def test_internal_arenas_are_not_addressable_over_http(daemon):
    arenas = _internal_arenas()
    for arena in arenas:
        ref = {"shared_memory_region": arena, "shared_memory_byte_size": X.nbytes}
        code, body = _post(daemon, "/v2/models/digits/infer", _infer_body(in_params=ref))
        assert code == 400 and body["code"] == "shm_unknown_region", (arena, body)
        out_ref = {"shared_memory_region": arena, "shared_memory_byte_size": 2 * 10 * 4}
        code, body = _post(daemon, "/v2/models/digits/infer", _infer_body(out_params=out_ref))
        assert code == 400 and body["code"] == "shm_unknown_region", (arena, body)
    # nothing was queued to be freed for those offsets: the next requests all succeed
    for _ in range(20):
        code, body = _post(daemon, "/v2/models/digits/infer", _infer_body())
        assert code == 200, body
    # and the registry lists none of Ferry's own arenas
    code, listed = http_get(daemon.url + "/v2/systemsharedmemory/status")
    assert code == 200 and not any(r["name"].startswith("ferry-") for r in listed)


def test_internal_arenas_are_not_addressable_over_zmq(daemon):
    arena = next(n for n in _internal_arenas() if "-eng" in n)
    client = FerryClient(daemon.zmq_endpoint, timeout_s=30)
    try:
        ref = P.TensorRef("pixels", "float32", (2, 64), shm=P.ShmLoc(arena, 0, X.nbytes))
        reply, _ = client.send_raw(P.encode(P.Infer("probe-in", "digits", 0, [ref])))
        assert isinstance(reply, P.ErrorReply) and reply.code == "shm_unknown_region", reply
        with pytest.raises(FerryError) as err:
            client.infer("digits", {"pixels": X},
                         out_shm={"probabilities": P.ShmLoc(arena, 0, 2 * 10 * 4)})
        assert err.value.code == "shm_unknown_region"
        for _ in range(10):
            assert client.infer("digits", {"pixels": X})["probabilities"].shape == (2, 10)
    finally:
        client.sock.close(0)


def test_registration_refuses_symlinks_and_non_regular_files(daemon, tmp_path):
    target = Path("/dev/shm/fy_boundary_target")
    link = Path("/dev/shm/fy_boundary_link")
    fifo = Path("/dev/shm/fy_boundary_fifo")
    for p in (target, link, fifo):
        p.unlink(missing_ok=True)
    target.write_bytes(b"\0" * 4096)
    link.symlink_to(target)
    os.mkfifo(fifo)
    try:
        for key in ("/fy_boundary_link", "/fy_boundary_fifo"):
            code, body = _post(daemon, "/v2/systemsharedmemory/region/r1/register",
                               {"key": key, "offset": 0, "byte_size": 1024})
            assert code == 400 and body["code"] == "shm_bad_region", (key, body)
        code, body = _post(daemon, "/v2/systemsharedmemory/region/r1/register",
                           {"key": "/fy_boundary_target", "offset": 0, "byte_size": 1024})
        assert code == 200, body
    finally:
        _post(daemon, "/v2/systemsharedmemory/region/r1/unregister", {})
        for p in (target, link, fifo):
            p.unlink(missing_ok=True)


def test_registered_regions_are_capped(daemon):
    seg = Path("/dev/shm/fy_boundary_cap")
    seg.write_bytes(b"\0" * 4096)
    names = [f"cap{i}" for i in range(64)]
    try:
        for name in names:
            code, body = _post(daemon, f"/v2/systemsharedmemory/region/{name}/register",
                               {"key": "/fy_boundary_cap", "offset": 0, "byte_size": 64})
            assert code == 200, (name, body)
        code, body = _post(daemon, "/v2/systemsharedmemory/region/one_more/register",
                           {"key": "/fy_boundary_cap", "offset": 0, "byte_size": 64})
        assert code == 429 and body["code"] == "shm_too_many_regions", body
    finally:
        _post(daemon, "/v2/systemsharedmemory/unregister", {})
        seg.unlink(missing_ok=True)
    code, listed = http_get(daemon.url + "/v2/systemsharedmemory/status")
    assert code == 200 and listed == []
