"""Structured outputs through the OpenAI API with the `openai` package unchanged, against a
real daemon serving SmolLM2: response_format json_object / json_schema (incl.
`beta.chat.completions.parse` with a pydantic model), streamed, vLLM's guided_* and
structured_outputs on completions, the WebSocket API and batch items; bad constraints 400."""
from __future__ import annotations

import asyncio
import json
import re
import time

import aiohttp
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import Daemon, orphan_segments, wait_until

pytestmark = pytest.mark.timeout(180)

ASK = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
# A 135M model may ramble on inside a free-form object; a direct request keeps it short.
SHORT = [{"role": "user", "content": 'Reply with a JSON object with one key, "capital", the '
          'capital of France.'}]


class City(BaseModel):
    city: str = Field(max_length=24)
    country: str = Field(max_length=24)
    big: bool


@pytest.fixture(scope="module")
def ferry(demo_models, tmp_path_factory):
    d = Daemon(tensor_repo(demo_models, tmp_path_factory, names=("smollm2",)), workers=1,
               env={"FERRY_TORCH_THREADS": "1"}).start()
    yield d
    assert d.stop() == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"


def test_json_object_chat_is_valid_json(client):
    r = client.chat.completions.create(model="smollm2", messages=SHORT, max_tokens=80,
                                       temperature=0, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_parse_with_a_pydantic_model(client):
    r = client.beta.chat.completions.parse(model="smollm2", messages=ASK, max_tokens=80,
                                           temperature=0, response_format=City)
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, City), r
    jsonschema.validate(json.loads(r.choices[0].message.content), City.model_json_schema())


def test_streamed_json_schema_assembles_to_valid_output(client):
    schema = {"type": "object", "additionalProperties": False, "required": ["n", "tags"],
              "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9},
                             "tags": {"type": "array", "maxItems": 2,
                                      "items": {"enum": ["red", "green", "blue"]}}}}
    stream = client.chat.completions.create(
        model="smollm2", messages=ASK, max_tokens=60, temperature=0.9, seed=11, stream=True,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "t", "schema": schema, "strict": True}})
    text, reasons = "", []
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.finish_reason:
                reasons.append(c.finish_reason)
    assert reasons == ["stop"], (text, reasons)
    jsonschema.validate(json.loads(text), schema)


def test_vllm_guided_fields_on_completions(client):
    regex = client.completions.create(model="smollm2", prompt="My phone number is",
                                      max_tokens=30, temperature=0.8, seed=5,
                                      extra_body={"guided_regex": r"\+33 [0-9]{9}"})
    assert re.fullmatch(r"\+33 [0-9]{9}", regex.choices[0].text), regex
    choice = client.completions.create(model="smollm2", prompt="The sky is", max_tokens=10,
                                       extra_body={"guided_choice": ["blue", "green"]})
    assert choice.choices[0].text in ("blue", "green")
    new = client.chat.completions.create(
        model="smollm2", messages=ASK, max_tokens=20,
        extra_body={"structured_outputs": {"grammar": 'root ::= "Paris" | "Lyon"'}})
    assert new.choices[0].message.content in ("Paris", "Lyon")


def test_stop_strings_still_end_a_constrained_generation(client):
    r = client.completions.create(model="smollm2", prompt="Write the alphabet:", max_tokens=40,
                                  temperature=0, stop=["e"],
                                  extra_body={"guided_regex": "[a-z ]{10,40}"})
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and "e" not in choice.text, choice
    assert re.fullmatch("[a-z ]*", choice.text), choice


@pytest.mark.parametrize("extra,code", [
    ({"guided_regex": "("}, "invalid_grammar"),
    ({"guided_grammar": "root ::= missing"}, "invalid_grammar"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": "{"}}},
     "invalid_parameter"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "invalid_parameter"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_constraints_are_400(client, extra, code, stream):
    with pytest.raises(openai.BadRequestError) as err:
        r = client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=5,
                                           stream=stream, extra_body=extra)
        if stream:
            list(r)
    assert err.value.status_code == 400
    assert err.value.body["code"] == code, err.value.body


def test_a_large_schema_is_checked_off_the_event_loop(ferry, client):
    """A body over 32 KiB is parsed (its grammar compiled) in a thread: the answer is still
    valid, and a bad schema is still a 400 (not an error lost in the thread)."""
    props = {f"field_{i}": {"type": "string", "maxLength": 4, "description": "d" * 400}
             for i in range(120)}
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               **props},
              "required": ["city"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "big", "schema": schema}}
    assert len(json.dumps(fmt)) > 48 << 10
    r = client.chat.completions.create(model="smollm2", messages=SHORT, max_tokens=60,
                                       temperature=0, response_format=fmt)
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    bad = {"type": "json_schema", "json_schema": {"name": "big", "schema": {
        **schema, "properties": {**schema["properties"], "x": {"type": "no-such-type"}}}}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smollm2", messages=SHORT, max_tokens=5,
                                       response_format=bad)
    assert err.value.status_code == 400, err.value.body


def test_websocket_inference_takes_a_constraint(ferry):
    async def go() -> dict:
        async with aiohttp.ClientSession() as s, s.ws_connect(ferry.url + "/v1/ws") as ws:
            await ws.send_json({"type": "inference", "id": "j", "model": "smollm2",
                                "messages": ASK, "max_tokens": 20,
                                "guided_choice": ["yes", "no"]})
            while True:
                msg = json.loads((await ws.receive(timeout=60)).data)
                if msg["type"] in ("complete", "error"):
                    return msg
    msg = asyncio.run(go())
    assert msg["type"] == "complete" and msg["text"] in ("yes", "no"), msg


def test_batch_items_take_a_constraint(ferry):
    import urllib.request
    body = {"requests": [{"custom_id": "c", "url": "/v1/chat/completions",
                          "body": {"model": "smollm2", "messages": SHORT, "max_tokens": 80,
                                   "temperature": 0,
                                   "response_format": {"type": "json_object"}}}]}
    req = urllib.request.Request(ferry.url + "/v1/batches", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        job = json.loads(resp.read())

    def results():
        with urllib.request.urlopen(f"{ferry.url}/v1/batches/{job['id']}/results",
                                    timeout=30) as resp:
            data = json.loads(resp.read())["data"]
        return data if data and data[0]["status"] not in ("pending", "running") else None
    [item] = wait_until(results, 120, "the batch item")
    assert item["status"] == "done", item
    choice = item["response"]["body"]["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    assert isinstance(json.loads(choice["message"]["content"]), dict), item
