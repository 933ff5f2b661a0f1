"""A real daemon on tiny GGUF files: one with a SentencePiece vocabulary (trained here with the
sentencepiece package) is served, tokenized exactly as SentencePiece does; one whose tokenizer
Ferry cannot build and one whose sliding-window layers are given in a form Ferry does not read
(an integer sliding_window_pattern) fail to load, and /readyz says why
(paths masked) instead of the model reading ready and every text request getting a 500."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.integration.daemon_proc import Daemon, http_get, orphan_segments
from tests.spm_vocab import train, write_spm_gguf

gguf = pytest.importorskip("gguf")
pytest.importorskip("sentencepiece")
pytestmark = pytest.mark.timeout(180)

PROMPT = "it was the best of times, it was 1859 😀"


def tiny_llama(path, vocab: int, extra) -> None:
    """A random 2-layer Llama as an F32 GGUF file; `extra(writer)` adds tokenizer metadata."""
    rng = np.random.default_rng(0)
    hidden, ffn, layers = 32, 48, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    extra(w)

    def add(name, *shape):
        w.add_tensor(name, (0.05 * rng.standard_normal(shape)).astype(np.float32))
    add("token_embd.weight", vocab, hidden)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        add(f"blk.{i}.attn_q.weight", hidden, hidden)
        add(f"blk.{i}.attn_k.weight", hidden // 2, hidden)
        add(f"blk.{i}.attn_v.weight", hidden // 2, hidden)
        add(f"blk.{i}.attn_output.weight", hidden, hidden)
        add(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        add(f"blk.{i}.ffn_up.weight", ffn, hidden)
        add(f"blk.{i}.ffn_down.weight", hidden, ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def model_dir(repo, name: str, vocab: int, extra) -> None:
    d = repo / name / "1"
    d.mkdir(parents=True)
    tiny_llama(d / "m.gguf", vocab, extra)
    (d / "model.toml").write_text('engine = "llm"\nweights = "m.gguf"\n\n[llm]\n'
                                  'kv_cache_mb = 4\nmax_num_seqs = 2\n')


@pytest.fixture(scope="module")
def sp():
    return train(vocab_size=600)


@pytest.fixture(scope="module")
def ferry(sp, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    n = sp.get_piece_size()
    model_dir(repo, "spm", n, lambda w: write_spm_gguf(None, sp, writer=w))

    def bert(w):
        w.add_tokenizer_model("bert")
        w.add_token_list([f"t{i}" for i in range(n)])
    model_dir(repo, "badtok", n, bert)

    def window(w):
        write_spm_gguf(None, sp, writer=w)
        w.add_key_value("llama.attention.sliding_window", 16, gguf.GGUFValueType.UINT32)
        w.add_key_value("llama.attention.sliding_window_pattern", 2, gguf.GGUFValueType.UINT32)
    model_dir(repo, "window", n, window)
    model_dir(repo, "novocab", n, lambda w: None)      # serves token ids only (ZMQ)
    d = Daemon(repo, workers=1, env={"FERRY_TORCH_THREADS": "1"}).start()
    d.repo = repo
    yield d
    assert d.stop() == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"


def post(d, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(d.url + path, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_readyz_names_why_models_failed(ferry):
    status, body = http_get(ferry.url + "/readyz")
    assert status == 200, body
    assert body["models"] == {"spm": {"1": "ready"}, "badtok": {"1": "failed"},
                              "window": {"1": "failed"}, "novocab": {"1": "ready"}}
    assert "'bert' is not supported" in body["errors"]["badtok"]["1"]
    assert "llama.attention.sliding_window_pattern=2" in body["errors"]["window"]["1"]
    assert str(ferry.repo) not in json.dumps(body)          # an open route: no paths
    assert "spm" not in body["errors"]


def test_sentencepiece_model_is_tokenized_as_sentencepiece_does(ferry, sp):
    status, out = post(ferry, "/tokenize", {"model": "spm", "prompt": PROMPT})
    assert status == 200, out
    assert out["tokens"] == [sp.bos_id()] + sp.encode(PROMPT)      # BOS: add_bos_token
    status, out = post(ferry, "/detokenize", {"model": "spm", "tokens": sp.encode(PROMPT)})
    assert status == 200 and out["prompt"] == PROMPT, out


def test_sentencepiece_model_generates(ferry, sp):
    status, out = post(ferry, "/v1/completions", {"model": "spm", "prompt": PROMPT,
                                                   "max_tokens": 8, "temperature": 0})
    assert status == 200, out
    assert out["usage"]["prompt_tokens"] == 1 + len(sp.encode(PROMPT))
    assert isinstance(out["choices"][0]["text"], str)
    assert out["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("model", ["badtok", "window"])
def test_requests_to_a_failed_model_are_not_500s(ferry, model):
    status, out = post(ferry, "/v1/completions", {"model": model, "prompt": "hi",
                                                   "max_tokens": 2})
    assert status != 500 and out["error"]["code"] != "tokenizer_error", out


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
    ("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": 2}),
    ("/tokenize", {"prompt": "hi"}),
])
def test_text_requests_to_a_model_without_a_tokenizer_are_a_clear_400(ferry, path, body):
    status, out = post(ferry, path, {"model": "novocab", **body})
    assert status == 400 and out["error"]["code"] == "model_has_no_tokenizer", out
    assert "no tokenizer vocabulary" in out["error"]["message"], out
