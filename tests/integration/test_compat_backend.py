"""Seed 001 (AI Inference Backend, ../shared/seeds/001-ai-inference-backend.md): its curl
examples sent as written (summarization, sentiment, generation, batch, health, models,
metrics), the documented response format, and refusals; plus the /infer and /health path
decisions ([compat] root = "backend" in this daemon)."""
from __future__ import annotations

import re
import uuid
from datetime import datetime

import pytest

from tests.integration.compat_client import slow_call, stop_cleanly
from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import Daemon
from tests.integration.secure_daemon import call

pytestmark = pytest.mark.timeout(300)

SUMMARIZE = {"text": "The quick brown fox jumps over the lazy dog. This is a sample text that "
             "needs to be summarized to demonstrate the summarization capabilities of the AI "
             "inference backend platform.", "model": "summarizer", "version": "v1"}
SENTIMENT = {"text": "I love this AI inference backend! It works perfectly.",
             "model": "sentiment", "version": "v1"}
GENERATE = {"text": "The future of AI is", "model": "generator", "version": "v1",
            "parameters": {"max_length": 50}}
BATCH = {"requests": [{"text": "First text to process", "model": "summarizer"},
                      {"text": "Second text to process", "model": "sentiment"}]}


@pytest.fixture(scope="module")
def ferry(demo_models, tmp_path_factory):
    d = Daemon(tensor_repo(demo_models, tmp_path_factory, ("smollm2", "digits")), workers=1,
               extra_config="[compat]\nroot = \"backend\"\n",
               env={"FERRY_TORCH_THREADS": "1"}).start()
    yield d
    stop_cleanly(d)


def _response_format(body, model: str) -> None:
    assert body["success"] is True and isinstance(body["result"], str)
    assert body["model_used"] == f"{model}:v1" and body["metadata"]["model_type"] == model
    assert isinstance(body["latency_ms"], float) and body["latency_ms"] > 0
    uuid.UUID(body["request_id"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", body["timestamp"])
    datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00"))


def test_health_and_models(ferry):
    status, _, body = call(ferry, "GET", "/health")     # root = "backend": its body
    assert status == 200 and body["status"] == "healthy" and body["models_loaded"] == 2, body
    status, _, body = call(ferry, "GET", "/models")
    assert status == 200, body
    assert [m["name"] for m in body["models"]] == ["summarizer", "sentiment", "generator"]
    assert all(m["version"] == "v1" and m["model"] == "smollm2" and m["loaded"]
               for m in body["models"])
    status, _, text = call(ferry, "GET", "/metrics")
    assert status == 200 and "ferry_" in text


def test_summarization_example(ferry):
    status, _, body = slow_call(ferry, "POST", "/infer", SUMMARIZE)
    assert status == 200, body
    _response_format(body, "summarizer")
    assert body["result"] and body["metadata"]["served_by"] == "smollm2"


def test_summaries_are_greedy_and_min_length_is_their_floor(ferry):
    # greedy, as the seed's BART: the same text gives the same summary
    first = slow_call(ferry, "POST", "/infer", SUMMARIZE)[2]
    assert slow_call(ferry, "POST", "/infer", SUMMARIZE)[2]["result"] == first["result"]
    # the model ends this summary by itself after 25 tokens; a floor of 40 holds the end back
    assert first["metadata"]["finish_reason"] == "stop"
    assert first["metadata"]["tokens_generated"] < 40, first
    floor = {**SUMMARIZE, "parameters": {"min_length": 40, "max_length": 45}}
    status, _, body = slow_call(ferry, "POST", "/infer", floor)
    assert status == 200, body
    assert 40 <= body["metadata"]["tokens_generated"] <= 45, body
    assert body["result"].startswith(first["result"][:20]), (body, first)   # the same start


def test_sentiment_example(ferry):
    status, _, body = slow_call(ferry, "POST", "/infer", SENTIMENT)
    assert status == 200, body
    _response_format(body, "sentiment")
    assert body["result"] in ("positive", "negative", "neutral")


def test_generation_example(ferry):
    status, _, body = slow_call(ferry, "POST", "/infer", GENERATE)
    assert status == 200, body
    _response_format(body, "generator")
    assert 0 < body["metadata"]["tokens_generated"] <= 50


def test_batch_example(ferry):
    status, _, body = slow_call(ferry, "POST", "/infer/batch", BATCH)
    assert status == 200, body
    assert body["success"] is True and body["total"] == 2 and body["successful"] == 2
    first, second = body["results"]
    _response_format(first, "summarizer")
    _response_format(second, "sentiment")
    assert second["result"] in ("positive", "negative", "neutral")


def test_one_bad_item_does_not_fail_the_batch(ferry):
    status, _, body = slow_call(ferry, "POST", "/compat/backend/infer/batch", {"requests": [
        {"text": "ok", "model": "generator", "parameters": {"max_length": 2}},
        {"text": "x", "model": "translator"}]})
    assert status == 200, body
    assert body["success"] is False and body["failed"] == 1
    assert body["results"][1] == {**body["results"][1], "success": False,
                                  "code": "model_not_found", "param": "requests[1].model"}


@pytest.mark.parametrize("body,status,code,param", [
    ({"model": "summarizer"}, 400, "missing_parameter", "text"),
    ({"text": "  ", "model": "summarizer"}, 400, "missing_parameter", "text"),
    ({"text": "x", "model": "translator"}, 404, "model_not_found", "model"),
    ({"text": "x", "model": "sentiment", "version": "v2"}, 404, "model_not_found", "version"),
    ({"text": "x", "model": "generator", "parameters": {"max_length": 0}}, 400,
     "invalid_parameter", "parameters.max_length"),
    ({"text": "x", "model": "generator", "parameters": {"temperature": 1}}, 400,
     "unknown_parameter", "parameters.temperature"),
    ({"text": "x", "model": "generator", "parameters": {"num_return_sequences": 3}}, 400,
     "unsupported_parameter", "parameters.num_return_sequences"),
    ({"text": "x", "parameters": []}, 400, "invalid_parameter", "parameters"),
    ({"text": "x", "parameters": {"min_length": -1}}, 400, "invalid_parameter",
     "parameters.min_length"),
    ({"text": "x", "parameters": {"min_length": "5"}}, 400, "invalid_parameter",
     "parameters.min_length"),
    ({"text": "x", "parameters": {"max_length": 4, "min_length": 5}}, 400, "invalid_parameter",
     "parameters.min_length"),
])
def test_bad_requests(ferry, body, status, code, param):
    got, _, answer = call(ferry, "POST", "/compat/backend/infer", body=body)
    assert got == status, answer
    assert answer["success"] is False and answer["detail"] == answer["error"]["message"]
    assert answer["error"]["code"] == code and answer["error"]["param"] == param, answer


def test_bad_batches(ferry):
    for body in ({}, {"requests": []}, {"requests": "x"}, {"requests": [{}] * 33}):
        status, _, answer = call(ferry, "POST", "/infer/batch", body=body)
        assert status == 400 and answer["error"]["param"] == "requests", answer


def test_infer_goes_by_body_shape(ferry):
    # a seed-002 body at the shared /infer path reaches seed 002's route, root or not
    status, _, body = call(ferry, "POST", "/infer", body={
        "id": "r1", "model_id": "nope", "prompt": "A lake"})
    assert status == 404 and body["error"]["param"] == "model_id", body
    status, _, body = call(ferry, "POST", "/infer", raw=b"not json",
                           headers={"Content-Type": "application/json"})
    assert status == 400 and body["error"]["code"] == "invalid_json", body


def test_batch_items_are_all_counted(ferry):
    """Every item of /infer/batch is in the request's tokens (charged to the key and logged),
    not only the last one started."""
    import sqlite3

    from tests.integration.daemon_proc import wait_until

    def logged(route: str) -> list:
        with sqlite3.connect(ferry.state_dir / "ferry.db") as db:
            return db.execute("SELECT prompt_tokens, completion_tokens FROM request_log "
                              "WHERE route = ? AND status = 200 ORDER BY id", (route,)).fetchall()
    before = len(logged("POST /infer/batch")), len(logged("POST /infer"))
    item = {"text": "Count every token of this batch", "model": "generator",
            "parameters": {"max_length": 3}}
    status, _, body = slow_call(ferry, "POST", "/infer/batch", {"requests": [item] * 3})
    assert status == 200 and body["successful"] == 3, body
    generated = sum(r["metadata"]["tokens_generated"] for r in body["results"])
    status, _, one = slow_call(ferry, "POST", "/infer", item)
    assert status == 200, one
    wait_until(lambda: len(logged("POST /infer/batch")) > before[0]
               and len(logged("POST /infer")) > before[1], 10, "the request log rows")
    prompt_one = logged("POST /infer")[-1][0]
    assert prompt_one > 0
    assert logged("POST /infer/batch")[-1] == (3 * prompt_one, generated)


def test_min_tokens_beyond_the_context_and_a_floor_above_the_default_length(ferry):
    status, _, body = call(ferry, "POST", "/v1/completions",
                           body={"model": "smollm2", "prompt": "hi", "min_tokens": 10**6})
    assert status == 400, body
    assert (body["error"]["code"], body["error"]["param"]) == ("context_length_exceeded",
                                                               "min_tokens")
    # min_length above the summarizer's default max_length (60) raises that default
    status, _, body = slow_call(ferry, "POST", "/infer",
                                {**SUMMARIZE, "parameters": {"min_length": 64}})
    assert status == 200, body
    assert body["metadata"]["tokens_generated"] >= 64, body
