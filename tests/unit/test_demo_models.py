"""The demo models, checked against their sources and run through the real OnnxEngine."""
from __future__ import annotations

import hashlib
import os
import tomllib
from pathlib import Path

import numpy as np
import pytest

from daemon import demo
from daemon.repository_spec import load_spec
from engines.base import TensorRequest
from engines.onnx.engine import OnnxEngine
from tests.engine_steps import drain as drain_steps

SENTENCES = [
    "Hello!",
    "The quick brown fox jumps over the lazy dog.",
    "Ferry batches requests of different lengths and pads them to the longest one.",
    "A much longer passage " + "about bare-metal inference daemons and their latency " * 20,
    "短い文",
]


def drain(engine, timeout: float = 30.0) -> dict:
    return drain_steps(engine, timeout)


def load(repo: Path, name: str) -> OnnxEngine:
    engine = OnnxEngine()
    engine.load(load_spec(repo / name / "1", name, 1), "cpu")
    return engine


@pytest.fixture(scope="module")
def minilm(demo_models):
    return load(demo_models, "minilm")


@pytest.fixture(scope="module")
def encoded(demo_models) -> list[np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(demo_models / "minilm" / "1" / "tokenizer.json"))
    return [np.array([e.ids], np.int64) for e in tok.encode_batch(SENTENCES)]


def minilm_inputs(ids: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def embed_one_by_one(engine: OnnxEngine, encoded: list[np.ndarray]) -> list[np.ndarray]:
    out = []
    for i, ids in enumerate(encoded):
        engine.submit(TensorRequest(f"s{i}", minilm_inputs(ids)))
        out.append(drain(engine)[f"s{i}"].outputs["embeddings"][0])
    return out


def test_tokenizer_is_unpadded_and_truncates_at_256(encoded):
    lengths = [ids.shape[1] for ids in encoded]
    assert len(set(lengths)) == len(lengths) and 128 < max(lengths) <= 256


def test_minilm_matches_pytorch(demo_models, minilm, encoded):
    import torch
    from transformers import BertModel

    bert = BertModel.from_pretrained(str(demo.minilm_source_dir())).eval()
    onnx_embeddings = embed_one_by_one(minilm, encoded)
    for ids, got in zip(encoded, onnx_embeddings):
        with torch.no_grad():
            hidden = bert(input_ids=torch.from_numpy(ids)).last_hidden_state[0]     # [S, 384]
        ref = torch.nn.functional.normalize(hidden.mean(dim=0), dim=0).numpy()
        assert got.shape == (384,)
        assert float(np.dot(got, ref) / np.linalg.norm(got) / np.linalg.norm(ref)) > 0.999


def test_minilm_padded_batch_equals_one_by_one(minilm, encoded):
    alone = embed_one_by_one(minilm, encoded)
    batches_before = minilm.stats()["batches"]
    for i, ids in enumerate(encoded):
        minilm.submit(TensorRequest(f"b{i}", minilm_inputs(ids)))
    out = drain(minilm)
    assert minilm.stats()["batches"] == batches_before + 1           # one padded batch of 5
    assert all(out[f"b{i}"].batch_size == len(encoded) for i in range(len(encoded)))
    for i, ref in enumerate(alone):
        np.testing.assert_allclose(out[f"b{i}"].outputs["embeddings"][0], ref, atol=1e-5)
        assert np.linalg.norm(ref) == pytest.approx(1.0, abs=1e-5)


def test_digits_classify_the_held_out_split(demo_models):
    engine = load(demo_models, "digits")
    _, x_test, _, y_test = demo.digits_split()
    for i in range(len(x_test)):
        engine.submit(TensorRequest(str(i), {"pixels": x_test[i:i + 1]}))
    out = drain(engine)
    probs = np.concatenate([out[str(i)].outputs["probabilities"] for i in range(len(x_test))])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    accuracy = float((probs.argmax(axis=1) == y_test).mean())
    assert accuracy > 0.95
    meta = tomllib.loads((demo_models / "digits" / "1" / "model.toml").read_text())["metadata"]
    assert accuracy == pytest.approx(meta["test_accuracy"], abs=1.5 / len(y_test))
    assert engine.stats()["avg_batch_size"] > 1


def test_digits_model_toml_declares_pre_and_post_processing(demo_models):
    spec = load_spec(demo_models / "digits" / "1", "digits", 1)
    assert spec.section("preprocess") == {"kind": "image", "width": 8, "height": 8, "channels": 1,
                                          "scale": 16.0, "invert": False, "layout": "flat",
                                          "input": "pixels"}
    post = spec.section("postprocess")
    assert post["labels"] == [str(i) for i in range(10)] and post["top_k"] == 3


def test_minilm_spec_declares_padding_and_tokenizer(demo_models):
    spec = load_spec(demo_models / "minilm" / "1", "minilm", 1)
    assert spec.section("batching")["pad_dims"] == {"input_ids": 0, "attention_mask": 0}
    assert spec.section("tokenizer") == {"file": "tokenizer.json", "max_length": 256}


def test_smollm2_links_the_packaged_gguf(demo_models):
    spec = load_spec(demo_models / "smollm2" / "1", "smollm2", 1)
    weights = spec.path / spec.weights
    assert spec.engine == "llm" and spec.section("llm")["kv_cache_mb"] == 256
    assert weights.resolve() == demo.smollm2_gguf().resolve()
    assert os.path.islink(weights) or weights.stat().st_size > 50_000_000
    digest = hashlib.sha256(demo.smollm2_gguf().read_bytes()).hexdigest()
    assert spec.sha256 == digest


def test_preparing_again_is_a_no_op(demo_models, capsys):
    assert demo.main(["--out", str(demo_models)]) == 0
    assert "built nothing" in capsys.readouterr().out
    assert not [p for p in demo_models.iterdir() if p.name.startswith(".")]


def test_a_failed_rebuild_keeps_the_old_version(tmp_path):
    def good(out: Path) -> None:
        out.mkdir()
        (out / "model.toml").write_text("old")

    def broken(out: Path) -> None:
        out.mkdir()
        (out / "model.toml").write_text("half")
        raise RuntimeError("export failed")

    demo._build_atomically(tmp_path, "m", good)
    with pytest.raises(RuntimeError):
        demo._build_atomically(tmp_path, "m", broken)
    assert (tmp_path / "m" / "1" / "model.toml").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
