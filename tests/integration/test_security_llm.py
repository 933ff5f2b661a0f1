"""Keys against the text-generation routes of a real daemon (SmolLM2 and MiniLM): tokens per
minute charged for streamed SSE and WebSocket generations (whose usage is in no JSON body), the
official `openai` client's stream, and the model list filtered by a key's allow-list."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest

from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import orphan_segments
from tests.integration.secure_daemon import SecureDaemon, call, error_code

pytestmark = pytest.mark.timeout(240)

CHAT = [{"role": "user", "content": "Count from one to twenty."}]
TOKENS = 16                       # max_tokens of every generation here
# One request reserves its prompt (36 tokens) + max_tokens (16) = 52 at admission: the first
# fits, a second would cross the limit and is refused before it runs.
TPM = 80


@pytest.fixture(scope="module")
def ferry(demo_models, tmp_path_factory):
    d = SecureDaemon(tensor_repo(demo_models, tmp_path_factory, ("minilm", "smollm2")),
                     workers=1, extra_config="[auth]\nrequired = true\n",
                     env={"FERRY_TORCH_THREADS": "1"})

    async def seed(state) -> dict[str, str]:
        k = state.keys
        return {"sse": (await k.create("sse", tpm=TPM)).plaintext,
                "openai": (await k.create("openai", tpm=TPM)).plaintext,
                "ws": (await k.create("ws", tpm=TPM)).plaintext,
                "embed": (await k.create("embed", tpm=TPM)).plaintext,
                "minilm": (await k.create("minilm-only", models=["minilm"])).plaintext,
                "all": (await k.create("all")).plaintext}
    d.keys = d.state(seed)
    d.start()
    yield d
    code = d.stop()
    assert code == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"


def _stream_sse(ferry, key: str) -> tuple[int, dict[str, str], list[dict]]:
    body = {"model": "smollm2", "messages": CHAT, "max_tokens": TOKENS, "stream": True,
            "ignore_eos": True, "temperature": 0}
    status, headers, text = call(ferry, "POST", "/v1/chat/completions", key=key, body=body)
    events = [json.loads(line[6:]) for line in str(text).splitlines()
              if line.startswith("data: {")]
    return status, headers, events


def test_streamed_sse_tokens_count_against_tokens_per_minute(ferry):
    status, headers, events = _stream_sse(ferry, ferry.keys["sse"])
    assert status == 200 and events and "error" not in events[-1]
    assert headers["X-RateLimit-Limit-Tokens"] == str(TPM)
    status, headers, err = call(ferry, "POST", "/v1/chat/completions", key=ferry.keys["sse"],
                                body={"model": "smollm2", "messages": CHAT, "stream": True,
                                      "max_tokens": TOKENS})
    assert status == 429 and error_code(err) == "token_rate_limited", err
    assert int(headers["X-RateLimit-Remaining-Tokens"]) < TPM - TOKENS
    assert int(headers["Retry-After"]) >= 1
    # Other keys are untouched.
    assert _stream_sse(ferry, ferry.keys["all"])[0] == 200


def test_embeddings_reserve_their_tokens_before_they_run(ferry):
    """An embeddings request is refused up front when its tokens do not fit the key's budget
    (it used to run and be charged afterwards, overdrawing the key by a whole request)."""
    key = ferry.keys["embed"]
    status, _, body = call(ferry, "POST", "/v1/embeddings", key=key, body={
        "model": "minilm", "input": ["word " * 100]})
    assert (status, error_code(body)) == (429, "request_exceeds_token_limit"), body
    status, headers, body = call(ferry, "POST", "/v1/embeddings", key=key, body={
        "model": "minilm", "input": ["word " * 48]})                 # 50 tokens of 80
    assert status == 200 and body["usage"]["prompt_tokens"] == 50, body
    assert int(headers["X-RateLimit-Remaining-Tokens"]) <= TPM - 50
    status, _, body = call(ferry, "POST", "/v1/embeddings", key=key, body={
        "model": "minilm", "input": ["word " * 48]})
    assert (status, error_code(body)) == (429, "token_rate_limited"), body


def test_the_openai_client_stream_is_charged_too(ferry):
    client = openai.OpenAI(base_url=ferry.url + "/v1", api_key=ferry.keys["openai"],
                           max_retries=0, timeout=60)
    stream = client.chat.completions.create(model="smollm2", messages=CHAT, stream=True,
                                            max_tokens=TOKENS, temperature=0,
                                            extra_body={"ignore_eos": True})
    assert sum(1 for chunk in stream if chunk.choices and chunk.choices[0].delta.content) > 0
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=1)
    assert info.value.body["code"] == "token_rate_limited"


def test_websocket_generations_count_against_tokens_per_minute(ferry):
    async def main() -> list[dict]:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(
                    ferry.url.replace("http", "ws", 1) + "/v1/ws",
                    headers={"Authorization": f"Bearer {ferry.keys['ws']}"}) as ws:
                replies = []
                for rid in ("first", "second"):
                    await ws.send_json({"type": "inference", "id": rid, "model": "smollm2",
                                        "messages": CHAT, "max_tokens": TOKENS,
                                        "ignore_eos": True, "temperature": 0})
                    while True:
                        msg = json.loads((await ws.receive(timeout=60)).data)
                        if msg.get("type") in ("complete", "error"):
                            replies.append(msg)
                            break
                return replies
    first, second = asyncio.run(asyncio.wait_for(main(), 120))
    assert first["type"] == "complete" and first["usage"]["total_tokens"] > TPM // 2, first
    assert second["type"] == "error" and second["code"] == "token_rate_limited", second
    assert second["id"] == "second" and second["status"] == 429


def test_model_list_shows_only_the_models_a_key_may_use(ferry):
    status, _, listing = call(ferry, "GET", "/v1/models", key=ferry.keys["minilm"])
    assert status == 200 and [m["id"] for m in listing["data"]] == ["minilm"]
    status, _, err = call(ferry, "GET", "/v1/models/smollm2", key=ferry.keys["minilm"])
    assert status == 403 and error_code(err) == "model_not_allowed"
    status, _, listing = call(ferry, "GET", "/v1/models", key=ferry.keys["all"])
    assert {m["id"] for m in listing["data"]} == {"minilm", "smollm2"}
