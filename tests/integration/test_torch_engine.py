"""The torch engine in a real daemon: the demo digits MLP as TorchScript and as an exported
program (the ONNX demo's own weights) and a small digits CNN, through KServe v2 (JSON, binary,
system shared memory with tritonclient), ZeroMQ (inline and shared memory), image predict,
metadata and config, memory accounting, bad inputs, and a version swap under load."""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import numpy as np
import pytest
import torch
import tritonclient.http as th

from daemon.demo import digits_split
from frontends.client import AsyncFerryClient, FerryClient
from tests.integration.daemon_proc import Daemon, http_get, orphan_segments
from tests.integration.forms import Part, multipart, post
from tests.torch_models import (cached_cnn, cnn_toml, digits_from_onnx, digits_toml,
                                save_exported, save_onnx, save_torchscript, write_version)
from tests.unit.test_preprocess import digit_png

pytestmark = pytest.mark.timeout(180)
DIGITS = ("digits", "digits_ts", "digits_ep")
CNNS = ("cnn_onnx", "cnn_ts", "cnn_ep")
CONST_CLASS = 7
LOOKUP_TOML = """engine = "torch"
max_batch_size = 8
[[inputs]]
name = "ids"
dtype = "int64"
shape = [-1, 4]
[[outputs]]
name = "out"
dtype = "float32"
shape = [-1, 4, 3]
"""


class Lookup(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.arange(30, dtype=torch.float32).reshape(10, 3))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]


def _const_digits() -> torch.nn.Module:
    """Every input is class CONST_CLASS: version 2 of digits_ts in the swap test."""
    from daemon.demo import DigitsClassifier
    body = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 10))
    with torch.no_grad():
        body[2].weight.zero_()
        body[2].bias.zero_()
        body[2].bias[CONST_CLASS] = 10.0
    return DigitsClassifier(body).eval()


@pytest.fixture(scope="module")
def repo(demo_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrepo")
    (root / "digits").symlink_to(demo_models / "digits", target_is_directory=True)
    mlp = digits_from_onnx(demo_models / "digits" / "1" / "model.onnx")
    x = torch.zeros(2, 64)
    d = write_version(root, "digits_ts", 1, {"model.toml": digits_toml()})
    save_torchscript(mlp, d / "model.pt", x)
    d = write_version(root, "digits_ep", 1, {"model.toml": digits_toml(weights="model.pt2")})
    save_exported(mlp, d / "model.pt2", x, "pixels")
    cnn, accuracy = cached_cnn()
    assert accuracy > 0.95, accuracy
    img = torch.zeros(2, 1, 8, 8)
    d = write_version(root, "cnn_onnx", 1, {"model.toml": cnn_toml("onnx", "model.onnx")})
    save_onnx(cnn, d / "model.onnx", img, "image", "logits")
    d = write_version(root, "cnn_ts", 1, {"model.toml": cnn_toml("torch", "model.pt")})
    save_torchscript(cnn, d / "model.pt", img)
    d = write_version(root, "cnn_ep", 1, {"model.toml": cnn_toml("torch", "model.pt2")})
    save_exported(cnn, d / "model.pt2", img, "image")
    d = write_version(root, "lookup", 1, {"model.toml": LOOKUP_TOML})
    torch.jit.script(Lookup()).save(str(d / "model.pt"))
    return root


@pytest.fixture(scope="module")
def daemon(repo):
    d = Daemon(repo, workers=2, env={"FERRY_TORCH_THREADS": "1"},
               extra_config='[repository]\ncontrol_mode = "explicit"\n').start(timeout_s=180)
    yield d
    # Only this daemon's segments: other daemons on the host may be mid-shutdown.
    pids = {str(p) for p in d.child_pids("")}
    code = d.stop()
    assert code == 0, d.log()[-4000:]
    leaked = {s for s in orphan_segments() if s.rsplit("-", 1)[-1] in pids}
    assert not leaked, f"shared-memory segments leaked: {leaked}"


@pytest.fixture(scope="module")
def kserve(daemon):
    c = th.InferenceServerClient(f"127.0.0.1:{daemon.port}")
    yield c
    c.close()


@pytest.fixture(scope="module")
def test_split():
    _, x, _, y = digits_split()
    return x.astype(np.float32), y


def _infer(kserve: th.InferenceServerClient, model: str, x: np.ndarray, binary: bool,
           name: str = "pixels") -> np.ndarray:
    inp = th.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = kserve.infer(model, [inp])
    return out.as_numpy(out.get_response()["outputs"][0]["name"])


# -- every tensor API ------------------------------------------------------------------------

def test_metadata_and_config_name_the_torch_formats(daemon, kserve):
    for model, platform in (("digits_ts", "pytorch_libtorch"), ("digits_ep", "pytorch_export")):
        meta = kserve.get_model_metadata(model)
        assert meta["platform"] == platform
        assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
        assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32",
                                    "shape": [-1, 10]}]
        status, cfg = http_get(f"{daemon.url}/v2/models/{model}/config")
        assert status == 200 and cfg["backend"] == "torch" and cfg["platform"] == platform
        assert cfg["max_batch_size"] == 64 and cfg["input"][0]["dims"] == [64]
        assert len(cfg["sha256"]) == 64


@pytest.mark.parametrize("binary", [False, True])
def test_kserve_answers_match_the_onnx_model_on_the_same_weights(kserve, test_split, binary):
    x, y = test_split
    x = x[:64]
    onnx = _infer(kserve, "digits", x, binary)
    for model in ("digits_ts", "digits_ep"):
        got = _infer(kserve, model, x, binary)
        assert got.shape == (64, 10)
        np.testing.assert_allclose(got, onnx, rtol=1e-5, atol=1e-6)
    assert (onnx.argmax(1) == y[:64]).mean() > 0.9


def test_system_shared_memory_with_tritonclient(kserve, test_split):
    import tritonclient.utils.shared_memory as shm
    x = test_split[0][:4]
    want = _infer(kserve, "digits", x, True)
    in_h = shm.create_shared_memory_region("t_in", "/fy_torch_in", x.nbytes)
    out_h = shm.create_shared_memory_region("t_out", "/fy_torch_out", 4 * 10 * 4)
    try:
        shm.set_shared_memory_region(in_h, [x])
        kserve.register_system_shared_memory("t_in", "/fy_torch_in", x.nbytes)
        kserve.register_system_shared_memory("t_out", "/fy_torch_out", 4 * 10 * 4)
        for model in ("digits_ts", "digits_ep"):
            inp = th.InferInput("pixels", [4, 64], "FP32")
            inp.set_shared_memory("t_in", x.nbytes)
            out = th.InferRequestedOutput("probabilities")
            out.set_shared_memory("t_out", 4 * 10 * 4)
            kserve.infer(model, [inp], outputs=[out])
            got = shm.get_contents_as_numpy(out_h, np.float32, [4, 10])
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(shm.get_contents_as_numpy(in_h, np.float32, [4, 64]),
                                          x)                 # the input region is untouched
    finally:
        kserve.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(in_h)
        shm.destroy_shared_memory_region(out_h)


def test_zmq_inline_and_shared_memory(daemon, test_split):
    x = test_split[0][:8]
    c = FerryClient(daemon.zmq_endpoint, timeout_s=30)
    try:
        want = c.infer("digits", {"pixels": x})["probabilities"]
        c.register_region("torch-zmq-region", 1 << 20)
        for model in ("digits_ts", "digits_ep"):
            inline = c.infer(model, {"pixels": x})["probabilities"]
            via_shm = c.infer(model, {"pixels": x}, use_shm=True)["probabilities"]
            np.testing.assert_allclose(inline, want, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(inline, via_shm)
    finally:
        c.close()


def _batch_sizes(stats: dict, key: str) -> dict[int, int]:
    for engine in stats["engines"]:
        if key in engine["models"]:
            return {int(k): v for k, v in engine["models"][key]["batch_sizes"].items()}
    raise AssertionError(f"{key} is on no engine")


@pytest.mark.parametrize("model", ["digits_ts", "digits_ep"])
def test_concurrent_requests_are_batched_together(daemon, test_split, model):
    x = test_split[0][:64]
    sync = FerryClient(daemon.zmq_endpoint)
    expected = sync.infer(model, {"pixels": x})["probabilities"]
    before = _batch_sizes(sync.stats(), f"{model}:1")

    async def run() -> list[np.ndarray]:
        clients = [AsyncFerryClient(daemon.zmq_endpoint) for _ in range(4)]
        try:
            jobs = [clients[i % 4].infer(model, {"pixels": x[i:i + 1]}) for i in range(64)]
            return [r["probabilities"] for r in await asyncio.gather(*jobs)]
        finally:
            for c in clients:
                await c.close()
    results = asyncio.run(run())
    for i, r in enumerate(results):
        np.testing.assert_allclose(r[0], expected[i], rtol=1e-5, atol=1e-6)
    after = _batch_sizes(sync.stats(), f"{model}:1")
    sync.close()
    new = {k: v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
    assert sum(k * v for k, v in new.items()) == 64, new
    assert any(size > 1 for size in new), new


def test_image_upload_through_a_cnn_agrees_across_engines(daemon, test_split):
    x, y = test_split
    correct = 0
    for i in range(10):
        answers = {}
        for model in CNNS:
            status, body = post(f"{daemon.url}/v1/models/{model}/predict",
                                *multipart([Part("file", digit_png(x[i]), "d.png",
                                                 "image/png")]))
            assert status == 200, body
            answers[model] = body["predictions"]
        top = answers["cnn_onnx"]
        for model in ("cnn_ts", "cnn_ep"):
            assert [p["label"] for p in answers[model]] == [p["label"] for p in top]
            for p, q in zip(answers[model], top):
                assert p["score"] == pytest.approx(q["score"], abs=1e-5)
        correct += top[0]["label"] == ("zero one two three four five six seven eight "
                                       "nine").split()[y[i]]
    assert correct >= 9, f"only {correct}/10 digits classified correctly"
    status, body = post(f"{daemon.url}/v1/models/digits_ep/predict",
                        *multipart([Part("file", digit_png(x[0]), "d.png", "image/png")]))
    assert status == 200 and body["predictions"][0]["label"] == str(y[0])


def test_memory_is_reserved_as_the_engine_measured_it(daemon):
    from daemon.cli import _control
    from daemon.config import load_config
    from daemon.memory import estimate_bytes
    from daemon.repository_spec import load_spec

    status = _control(load_config(daemon.config_path), "status", {})
    params = sum(p.numel() * 4 for p in _const_digits().parameters())
    expected: dict[str, int] = {}
    for name, model in status["models"].items():
        for version, v in model["versions"].items():
            if v["state"] != "ready":
                continue
            extra = v["info"]["extra"]
            if name.startswith("digits_"):
                assert extra["memory_bytes"] == params
            size = extra.get("memory_bytes") or estimate_bytes(
                load_spec(daemon.repo / name / version, name, int(version)))
            for eid in v["engines"]:
                expected[eid] = expected.get(eid, 0) + size
    reserved = {eid: e["memory"]["reserved_bytes"] for eid, e in status["engines"].items()}
    assert reserved == expected


# -- bad input -------------------------------------------------------------------------------

def _kserve(name: str, datatype: str, shape: list[int], data: list | None) -> bytes:
    inp: dict = {"name": name, "datatype": datatype, "shape": shape}
    if data is not None:
        inp["data"] = data
    return json.dumps({"inputs": [inp]}).encode()


BAD = [
    (_kserve("pixels", "FP64", [1, 64], [0.0] * 64), 400, "invalid_dtype"),
    (_kserve("pixels", "INT64", [1, 64], [0] * 64), 400, "invalid_dtype"),
    (_kserve("pixels", "FP32", [1, 63], [0.0] * 63), 400, "invalid_shape"),
    (_kserve("pixels", "FP32", [1, 64, 1], [0.0] * 64), 400, "invalid_shape"),
    (_kserve("image", "FP32", [1, 64], [0.0] * 64), 400, "unknown_input"),
    (b'{"inputs": []}', 400, "invalid_input"),
    (_kserve("pixels", "FP32", [65, 64], [0.0] * 65 * 64), 400, "batch_too_large"),
    (_kserve("pixels", "FP32", [2 ** 31, 64], [0.0] * 64), 400, "invalid_shape"),
]


@pytest.mark.parametrize("model", ["digits_ts", "digits_ep"])
def test_bad_inputs_get_stable_codes_and_the_model_keeps_serving(daemon, model):
    good = _kserve("pixels", "FP32", [1, 64], [1.0] * 64)
    for body, status, code in BAD:
        got, err = post(f"{daemon.url}/v2/models/{model}/infer", body, "application/json")
        assert (got, err.get("code")) == (status, code), (body[:80], err)
        assert err["message"] and "Traceback" not in err["message"]
    got, out = post(f"{daemon.url}/v2/models/{model}/infer", good, "application/json")
    assert got == 200 and len(out["outputs"][0]["data"]) == 10


def test_a_model_failing_on_a_request_is_a_400_not_a_500(daemon):
    url = f"{daemon.url}/v2/models/lookup/infer"
    got, err = post(url, _kserve("ids", "INT64", [1, 4], [1, 99, 0, 0]), "application/json")
    assert (got, err["code"]) == (400, "model_rejected_input")
    assert "99" in err["message"] and "code/__torch__" not in err["message"]
    got, out = post(url, _kserve("ids", "INT64", [1, 4], [1, 2, 0, 0]), "application/json")
    assert got == 200 and out["outputs"][0]["data"][:6] == [3, 4, 5, 6, 7, 8]


def test_a_file_that_is_no_torch_program_fails_to_load_with_its_reason(daemon, repo):
    d = write_version(repo, "broken", 1, {"model.toml": digits_toml(),
                                          "model.pt": (repo / "digits" / "1" / "model.onnx")})
    try:
        got, err = post(f"{daemon.url}/v2/repository/models/broken/load", b"", None)
        assert got == 422 and err["code"] == "model_load_failed", err
        assert 'engine = "onnx"' in err["message"]
    finally:
        for f in d.iterdir():
            f.unlink()


# -- hot swap --------------------------------------------------------------------------------

def _index(d: Daemon) -> dict[tuple[str, str], str]:
    status, rows = post(d.url + "/v2/repository/index", b"", "application/json")
    assert status == 200
    return {(r["name"], r["version"]): r["state"] for r in rows}  # type: ignore[union-attr]


async def _until(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_swapping_a_torch_version_under_load_fails_nothing(daemon, test_split):
    x, y = test_split
    i = next(i for i in range(len(y)) if y[i] != CONST_CLASS)
    url = f"{daemon.url}/v2/models/digits_ts/infer"
    body = json.loads(_kserve("pixels", "FP32", [1, 64], x[i].tolist()))
    results: list[tuple[int, str, int]] = []

    async def run() -> None:
        stop = asyncio.Event()

        async def client() -> None:
            async with aiohttp.ClientSession() as s:
                while not stop.is_set():
                    async with s.post(url, json=body) as r:
                        payload = await r.json(content_type=None)
                    if r.status == 200:
                        results.append((200, payload["model_version"],
                                        int(np.argmax(payload["outputs"][0]["data"]))))
                    else:
                        results.append((r.status, str(payload.get("code")), -1))

        tasks = [asyncio.create_task(client()) for _ in range(6)]
        try:
            await _until(lambda: len(results) >= 30, 60, "traffic on version 1")
            d = write_version(daemon.repo, "digits_ts", 2, {"model.toml": digits_toml()})
            save_torchscript(_const_digits(), d / "model.pt", torch.zeros(2, 64))
            async with aiohttp.ClientSession() as s:
                async with s.post(f"{daemon.url}/v2/repository/models/digits_ts/load") as r:
                    assert r.status == 200, await r.text()
            await _until(lambda: [r[1] for r in results[-12:]] == ["2"] * 12, 60,
                         "traffic to move to version 2")
            await _until(lambda: _index(daemon).get(("digits_ts", "1")) == "UNAVAILABLE", 60,
                         "version 1 to drain and unload")
            seen = len(results)
            await _until(lambda: len(results) >= seen + 30, 60, "traffic after the unload")
        finally:
            stop.set()
            await asyncio.gather(*tasks)

    asyncio.run(run())
    failed = [r for r in results if r[0] != 200]
    assert failed == [], f"{len(failed)} of {len(results)} requests failed: {failed[:5]}"
    v1 = {r[2] for r in results if r[1] == "1"}
    v2 = {r[2] for r in results if r[1] == "2"}
    assert v1 == {int(y[i])} and v2 == {CONST_CLASS}
