"""The OpenAI-compatible API through the official `openai` package, unchanged, against a real
daemon serving MiniLM (embeddings) and SmolLM2 (chat and completions)."""
from __future__ import annotations

import base64
import http.client
import json
import urllib.request

import numpy as np
import openai
import pytest

from frontends.client import FerryClient
from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import Daemon, orphan_segments, wait_until

pytestmark = pytest.mark.timeout(180)

SENTENCES = ["Ferry serves models.", "The quick brown fox jumps over the lazy dog.", "Bonjour"]
CHAT = [{"role": "user", "content": "Name three colours."}]
GREEDY = {"temperature": 0, "max_tokens": 10}
# One torch thread: on a busy 2-core machine two OpenMP threads per step contend with the
# frontends and the test process and make every step several times slower.
ENV = {"FERRY_TORCH_THREADS": "1"}


@pytest.fixture(scope="module")
def ferry(demo_models, tmp_path_factory):
    d = Daemon(tensor_repo(demo_models, tmp_path_factory, names=("minilm", "smollm2")),
               env=ENV).start()
    yield d
    code = d.stop()
    assert code == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"


def post(ferry, path: str, body: bytes | dict, ctype: str = "application/json"
         ) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(ferry.url + path, data=data, headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# -- models -------------------------------------------------------------------------------------

def test_models_list_and_retrieve(client):
    models = {m.id: m for m in client.models.list()}
    assert {"minilm", "smollm2"} <= set(models)
    assert models["smollm2"].object == "model" and models["smollm2"].owned_by == "ferry"
    assert isinstance(models["smollm2"].created, int)
    assert client.models.retrieve("smollm2").id == "smollm2"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.code == "model_not_found"


# -- chat ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def greedy_chat(client):
    # A first request fills the prefix cache, so that this one and the streamed one below both
    # reuse it the same way. With int8 weights (bfloat16 products) a cache hit recomputes only
    # the prompt's tail, whose logits differ from a full prefill's by ~0.4 — enough to break a
    # greedy near-tie — just as llama.cpp documents for `cache_prompt`. Equal paths, equal text.
    client.chat.completions.create(model="smollm2", messages=CHAT, **GREEDY)
    return client.chat.completions.create(model="smollm2", messages=CHAT, **GREEDY)


def test_chat_completion_shape_and_usage(greedy_chat):
    r = greedy_chat
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.model == "smollm2" and isinstance(r.created, int)
    choice = r.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 5 and 0 < u.completion_tokens <= GREEDY["max_tokens"]
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_streamed_chat_equals_non_streamed_greedy(client, greedy_chat):
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=CHAT, stream=True, stream_options={"include_usage": True},
        **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy_chat.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices
              and c.choices[0].finish_reason]
    assert finals == [greedy_chat.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == greedy_chat.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_max_tokens_ends_with_length(client):
    r = client.chat.completions.create(model="smollm2", messages=CHAT, temperature=0,
                                       max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_stop_string_cuts_the_text_and_the_generation(client, ferry, greedy_chat, stream):
    full = greedy_chat.choices[0].message.content
    stop = full[len(full) // 3:len(full) // 3 + 3]
    expected = full[:full.find(stop)]
    before = _llm_stats(ferry)["tokens_generated"]
    extra = {"stream_options": {"include_usage": True}} if stream else {}
    r = client.chat.completions.create(model="smollm2", messages=CHAT, stop=[stop, "@@@@"],
                                       stream=stream, **extra, **GREEDY)
    if stream:
        chunks = list(r)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reason, usage = chunks[-2].choices[0].finish_reason, chunks[-1].usage
    else:
        text, reason, usage = r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    assert (text, reason) == (expected, "stop")
    # The engine request was cancelled at the stop, not run to max_tokens: at most the token
    # in flight when the cancel arrived is generated beyond the ones the frontend consumed.
    assert usage.completion_tokens < greedy_chat.usage.completion_tokens - 2
    generated = _llm_stats(ferry)["tokens_generated"] - before
    assert usage.completion_tokens <= generated <= usage.completion_tokens + 2


def test_n_choices_and_seeded_sampling(client):
    kw = dict(model="smollm2", messages=CHAT, n=2, temperature=1.0, seed=7, max_tokens=4)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens <= 2 * 4
    streamed = list(client.chat.completions.create(**kw, stream=True))
    texts = ["", ""]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in a.choices]


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="smollm2", messages=CHAT, logprobs=True,
                                       temperature=0, max_tokens=4,
                                       extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(t.logprob <= 0.0 for t in content)
    assert "".join(t.token for t in content) == r.choices[0].message.content


def test_chat_top_logprobs_whole_and_streamed(client):
    kw = dict(model="smollm2", messages=CHAT, logprobs=True, top_logprobs=3, temperature=0,
              max_tokens=4, extra_body={"ignore_eos": True})
    content = client.chat.completions.create(**kw).choices[0].logprobs.content
    assert len(content) == 4
    for t in content:
        tops = t.top_logprobs
        assert len(tops) == 3 and tops[0].logprob >= tops[1].logprob >= tops[2].logprob
        assert tops[0].token == t.token and tops[0].logprob == pytest.approx(t.logprob)
    streamed = [e for chunk in client.chat.completions.create(**kw, stream=True)
                for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    assert [(e.token, [a.token for a in e.top_logprobs]) for e in streamed] == \
        [(e.token, [a.token for a in e.top_logprobs]) for e in content]


def test_completion_logprobs_with_alternatives(client):
    r = client.completions.create(model="smollm2", prompt="The capital of France is",
                                  temperature=0, max_tokens=3, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.top_logprobs) == 3
    for token, alts in zip(lp.tokens, lp.top_logprobs):
        assert 1 <= len(alts) <= 2 and max(alts, key=alts.get) == token


# -- completions --------------------------------------------------------------------------------

def test_completions_whole_and_streamed(client):
    kw = dict(model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=5)
    r = client.completions.create(**kw)
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert r.choices[0].text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == 5
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    echoed = client.completions.create(**kw, echo=True)
    assert echoed.choices[0].text == "The capital of France is" + r.choices[0].text


def test_completions_batch_of_prompts(client):
    r = client.completions.create(model="smollm2", prompt=["One, two,", "Red, green,"],
                                  temperature=0, max_tokens=3, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text          # greedy: both choices agree


# -- embeddings ---------------------------------------------------------------------------------

def _kserve_vector(ferry, tokenizer, text: str) -> np.ndarray:
    enc = tokenizer.encode(text)
    body = {"inputs": [{"name": n, "datatype": "INT64", "shape": [1, len(v)], "data": v}
                       for n, v in (("input_ids", enc.ids),
                                    ("attention_mask", enc.attention_mask))]}
    status, out = post(ferry, "/v2/models/minilm/infer", body)
    assert status == 200, out
    return np.asarray(out["outputs"][0]["data"], dtype=np.float32)


@pytest.mark.parametrize("fmt", [None, "float", "base64"], ids=["default", "float", "base64"])
def test_embeddings_equal_the_kserve_path(client, ferry, demo_models, fmt):
    """The client's default asks for base64 and decodes it itself; explicit formats do not."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(demo_models / "minilm" / "1" / "tokenizer.json"))
    kw = {"encoding_format": fmt} if fmt else {}
    r = client.embeddings.create(model="minilm", input=SENTENCES, **kw)
    assert r.model == "minilm" and [d.index for d in r.data] == [0, 1, 2]
    assert r.usage.prompt_tokens == sum(len(tok.encode(s).ids) for s in SENTENCES)
    for text, item in zip(SENTENCES, r.data):
        got = (np.frombuffer(base64.b64decode(item.embedding), dtype="<f4") if fmt == "base64"
               else np.asarray(item.embedding, dtype=np.float32))
        ref = _kserve_vector(ferry, tok, text)
        assert got.shape == (384,)
        assert float(got @ ref / (np.linalg.norm(got) * np.linalg.norm(ref))) > 0.9999


# -- bad input ----------------------------------------------------------------------------------

LONG = "hello " * 7000
BAD = [
    ("/v1/chat/completions", {"model": "smollm2"}, 400, "missing_parameter", "messages"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": []}, 400, "empty_messages",
     "messages"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": "hi"}, 400, "invalid_parameter",
     "messages"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": CHAT, "temperature": "x"}, 400,
     "invalid_parameter", "temperature"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": CHAT, "n": 9}, 400,
     "invalid_parameter", "n"),
    ("/v1/chat/completions", {"model": "nope", "messages": CHAT}, 404, "model_not_found",
     "model"),
    ("/v1/chat/completions", {"model": "minilm", "messages": CHAT}, 400,
     "model_not_generative", "model"),
    ("/v1/chat/completions", {"model": "smollm2",
                              "messages": [{"role": "user", "content": LONG}]}, 400,
     "context_length_exceeded", "messages"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": CHAT, "max_tokens": 10**6}, 400,
     "context_length_exceeded", "max_tokens"),
    ("/v1/completions", {"model": "smollm2", "prompt": LONG}, 400, "context_length_exceeded",
     "prompt"),
    ("/v1/completions", {"model": "smollm2", "prompt": 5}, 400, "invalid_parameter", "prompt"),
    ("/v1/completions", {"model": "smollm2", "prompt": [10**6]}, 400, "invalid_parameter",
     "prompt"),
    ("/v1/completions", {"model": "smollm2", "prompt": "a", "stop": ["a"] * 5}, 400,
     "invalid_parameter", "stop"),
    ("/v1/embeddings", {"model": "minilm"}, 400, "missing_parameter", "input"),
    ("/v1/embeddings", {"model": "minilm", "input": [1.5]}, 400, "invalid_parameter", "input"),
    ("/v1/embeddings", {"model": "smollm2", "input": "x"}, 400, "model_not_embedding",
     "model"),
    ("/v1/embeddings", {"model": "minilm", "input": LONG}, 400, "context_length_exceeded",
     "input"),
    ("/v1/embeddings", {"model": "minilm", "input": "x", "dimensions": 8}, 400,
     "unsupported_parameter", "dimensions"),
    ("/v1/embeddings", {"model": "nope", "input": "x"}, 404, "model_not_found", "model"),
]


@pytest.mark.parametrize("path,body,status,code,param", BAD,
                         ids=[f"{p.split('/')[-1]}-{c}-{pa}" for p, _, _, c, pa in BAD])
def test_bad_requests_get_openai_errors(ferry, path, body, status, code, param):
    got, out = post(ferry, path, body)
    assert got == status, out
    err = out["error"]
    assert (err["code"], err["param"]) == (code, param)
    assert err["message"] and err["type"] and err["request_id"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
def test_invalid_json_and_content_type(ferry, path):
    status, out = post(ferry, path, b'{"model": "smollm2", ')
    assert (status, out["error"]["code"]) == (400, "invalid_json")
    status, out = post(ferry, path, b"[1, 2]")
    assert (status, out["error"]["code"]) == (400, "invalid_json")
    status, out = post(ferry, path, b"model=smollm2", ctype="application/x-www-form-urlencoded")
    assert (status, out["error"]["code"]) == (415, "unsupported_media_type")


def test_client_sees_errors_as_openai_exceptions_and_server_keeps_serving(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smollm2", messages=CHAT, n=20)
    assert err.value.code == "invalid_parameter" and err.value.param == "n"
    r = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=2)
    assert r.choices[0].message.content is not None


# -- disconnects free the engine at once ---------------------------------------------------------

def _llm_stats(ferry) -> dict:
    with FerryClient(ferry.zmq_endpoint, timeout_s=10) as c:
        engines = c.stats()["engines"]
    return next(e["models"]["smollm2:1"] for e in engines if "smollm2:1" in e["models"])


@pytest.mark.parametrize("stream", [True, False], ids=["sse", "whole"])
def test_disconnect_cancels_the_engine_request(ferry, stream):
    max_tokens = 400
    before = _llm_stats(ferry)["tokens_generated"]
    conn = http.client.HTTPConnection("127.0.0.1", ferry.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps({
        "model": "smollm2", "messages": CHAT, "max_tokens": max_tokens, "stream": stream,
        "ignore_eos": True}), {"Content-Type": "application/json"})
    if stream:
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.readline().startswith(b"data: ")      # the role chunk
    wait_until(lambda: _llm_stats(ferry)["tokens_generated"] > before + 1, 30,
               "generation to start")
    if stream:
        resp.close()
    conn.close()            # the client goes away mid-generation
    stats = wait_until(lambda: (s := _llm_stats(ferry))["running"] == 0
                       and s["kv_blocks_used"] == 0 and s, 5, "the KV blocks to be freed")
    assert stats["tokens_generated"] - before < max_tokens


def test_llm_memory_is_reserved_as_measured_not_as_estimated(ferry):
    """The supervisor's memory ledger holds what the LLM engine reports it holds (weights as
    loaded, int8 or float, plus the KV cache), not the pre-load worst-case estimate."""
    from daemon.cli import _control
    from daemon.config import load_config
    from daemon.memory import estimate_bytes
    from daemon.repository_spec import load_spec

    status = _control(load_config(ferry.config_path), "status", {})
    reserved = {eid: e["memory"]["reserved_bytes"] for eid, e in status["engines"].items()}
    smol = status["models"]["smollm2"]["versions"]["1"]
    extra = smol["info"]["extra"]
    assert extra["weight_format"] in ("int4", "int8", "float")
    kv = extra["kv_blocks"] * extra["block_size"] * 2 * 30 * 3 * 64 * 4   # 30 layers, fp32
    assert extra["memory_bytes"] > kv
    minilm = estimate_bytes(load_spec(ferry.repo / "minilm" / "1", "minilm", 1))
    smol_estimate = estimate_bytes(load_spec(ferry.repo / "smollm2" / "1", "smollm2", 1))
    assert extra["memory_bytes"] < smol_estimate
    for eid in smol["engines"]:
        assert reserved[eid] == minilm + extra["memory_bytes"]
