"""KServe v2 through the official `tritonclient[http]`, unchanged, against a real daemon."""
from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from tests.integration.daemon_proc import http_get

SENTENCES = ["Ferry serves models.", "The quick brown fox jumps over the lazy dog near the river.",
             "Bonjour"]


@pytest.fixture(scope="module")
def client(daemon):
    c = th.InferenceServerClient(f"127.0.0.1:{daemon.port}")
    yield c
    c.close()


@pytest.fixture(scope="module")
def tokenizer(demo_models):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(demo_models / "minilm" / "1" / "tokenizer.json"))


def _torch_embeddings(texts: list[str]) -> np.ndarray:
    """The same model run directly in PyTorch (transformers), mean pooled and normalised."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from daemon.demo import minilm_source_dir
    src = minilm_source_dir()
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModel.from_pretrained(src).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state              # [B, S, 384]
    mask = enc["attention_mask"].unsqueeze(-1).float()       # [B, S, 1]
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def _inputs(tokenizer, text: str, binary: bool) -> list[th.InferInput]:
    enc = tokenizer.encode(text)
    out = []
    for name, values in (("input_ids", enc.ids), ("attention_mask", enc.attention_mask)):
        arr = np.asarray([values], dtype=np.int64)
        inp = th.InferInput(name, list(arr.shape), "INT64")
        inp.set_data_from_numpy(arr, binary_data=binary)
        out.append(inp)
    return out


def test_server_and_model_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("minilm")
    meta = client.get_model_metadata("minilm")
    assert meta["name"] == "minilm"
    assert [i["name"] for i in meta["inputs"]] == ["input_ids", "attention_mask"]
    assert meta["outputs"][0]["shape"] == [-1, 384]
    assert client.get_model_config("minilm")["max_batch_size"] > 0


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_minilm_embeddings_match_pytorch(client, tokenizer, binary):
    expected = _torch_embeddings(SENTENCES)
    for text, ref in zip(SENTENCES, expected):
        out = th.InferRequestedOutput("embeddings", binary_data=binary)
        res = client.infer("minilm", _inputs(tokenizer, text, binary), outputs=[out])
        emb = res.as_numpy("embeddings")
        assert emb.shape == (1, 384)
        cos = float(emb[0] @ ref / (np.linalg.norm(emb[0]) * np.linalg.norm(ref)))
        assert cos > 0.999, (text, cos)


def test_versioned_route_and_request_id(daemon, tokenizer):
    enc = tokenizer.encode("hello")
    body = json.dumps({"id": "abc", "inputs": [
        {"name": "input_ids", "datatype": "INT64", "shape": [1, len(enc.ids)], "data": enc.ids},
        {"name": "attention_mask", "datatype": "INT64", "shape": [1, len(enc.ids)],
         "data": enc.attention_mask}]}).encode()
    req = urllib.request.Request(daemon.url + "/v2/models/minilm/versions/1/infer", data=body,
                                 headers={"Content-Type": "application/json",
                                          "X-Request-ID": "req-42"})
    with urllib.request.urlopen(req) as resp:
        out = json.loads(resp.read())
        assert resp.headers["X-Request-ID"] == "req-42"
    assert out["id"] == "abc" and out["model_version"] == "1"
    assert len(out["outputs"][0]["data"]) == 384


def test_unknown_model_is_a_clear_404(client, tokenizer):
    with pytest.raises(InferenceServerException) as err:
        client.infer("no-such-model", _inputs(tokenizer, "x", False))
    assert err.value.status() == "404"
    assert "no-such-model" in err.value.message()


def test_health_routes(daemon):
    assert http_get(daemon.url + "/healthz")[0] == 200
    code, body = http_get(daemon.url + "/readyz")
    assert code == 200 and body["models"]["minilm"] == {"1": "ready"}


def test_system_shared_memory_with_tritonclient(client):
    """Triton's system shared-memory extension: inputs and outputs by reference, end to end."""
    import tritonclient.utils.shared_memory as shm

    from daemon.demo import digits_split
    _, x_test, _, _ = digits_split()
    x = x_test[:4].astype(np.float32)
    in_handle = shm.create_shared_memory_region("in_region", "/fy_test_in", x.nbytes)
    out_handle = shm.create_shared_memory_region("out_region", "/fy_test_out", 4 * 10 * 4)
    try:
        shm.set_shared_memory_region(in_handle, [x])
        client.register_system_shared_memory("in_region", "/fy_test_in", x.nbytes)
        client.register_system_shared_memory("out_region", "/fy_test_out", 4 * 10 * 4)
        status = client.get_system_shared_memory_status()
        assert {r["name"] for r in status} >= {"in_region", "out_region"}
        inp = th.InferInput("pixels", [4, 64], "FP32")
        inp.set_shared_memory("in_region", x.nbytes)
        out = th.InferRequestedOutput("probabilities", binary_data=True)
        out.set_shared_memory("out_region", 4 * 10 * 4)
        res = client.infer("digits", [inp], outputs=[out])
        meta = res.get_output("probabilities")
        assert meta["parameters"]["shared_memory_region"] == "out_region"
        via_shm = shm.get_contents_as_numpy(out_handle, np.float32, [4, 10])
        direct = th.InferInput("pixels", [4, 64], "FP32")
        direct.set_data_from_numpy(x)
        expected = client.infer("digits", [direct]).as_numpy("probabilities")
        np.testing.assert_allclose(via_shm, expected, rtol=1e-6)
        # a reference past the end of the registered region is refused
        bad = th.InferInput("pixels", [4, 64], "FP32")
        bad.set_shared_memory("in_region", x.nbytes, offset=64)
        with pytest.raises(InferenceServerException) as err:
            client.infer("digits", [bad])
        assert err.value.status() == "400"
    finally:
        client.unregister_system_shared_memory()
        assert client.get_system_shared_memory_status() == []
        shm.destroy_shared_memory_region(in_handle)
        shm.destroy_shared_memory_region(out_handle)


def test_cuda_shared_memory_routes_answer_clearly_without_a_gpu(client, daemon):
    """tritonclient's CUDA shared-memory calls: on a host with no CUDA engine, registering is a
    clear 400 (after the form is checked), status lists nothing, unregister succeeds."""
    assert client.get_cuda_shared_memory_status() == []
    with pytest.raises(InferenceServerException) as err:
        client.register_cuda_shared_memory("gpu_in", b"QUJD" * 16, 0, 1024)
    assert err.value.status() == "400" and "system shared memory" in err.value.message()
    client.unregister_cuda_shared_memory("gpu_in")
    client.unregister_cuda_shared_memory()
    with pytest.raises(InferenceServerException) as err:
        client.get_cuda_shared_memory_status("gpu_in")
    assert err.value.status() == "400"
    for body in ({}, {"raw_handle": "x", "device_id": 0, "byte_size": 8},
                 {"raw_handle": {"b64": "QQ=="}, "device_id": -1, "byte_size": 8},
                 {"raw_handle": {"b64": "QQ=="}, "device_id": 0, "byte_size": 0},
                 {"raw_handle": {"b64": "QQ=="}, "device_id": True, "byte_size": 8}):
        req = urllib.request.Request(daemon.url + "/v2/cudasharedmemory/region/r/register",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as http_err:
            urllib.request.urlopen(req, timeout=10)
        answer = json.loads(http_err.value.read())
        assert http_err.value.code == 400 and answer["code"] == "shm_bad_region", (body, answer)
