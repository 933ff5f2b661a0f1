"""Prefix caching end to end: a second request sharing a long system prompt prefills only its new
suffix (seen in the engine's stats and the response usage) and answers exactly as a cold one."""
from __future__ import annotations

import json
import urllib.request

import pytest

from frontends.client import FerryClient
from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import Daemon

SYSTEM = ("You are a meticulous assistant for a shipping company. " * 30).strip()


@pytest.fixture(scope="module")
def llm(demo_models, tmp_path_factory):
    d = Daemon(tensor_repo(demo_models, tmp_path_factory, ("smollm2",)), workers=1,
               env={"FERRY_TORCH_THREADS": "1"}).start(timeout_s=180)
    yield d
    assert d.stop() == 0


def _chat(d: Daemon, user: str) -> dict:
    body = json.dumps({"model": "smollm2", "temperature": 0, "max_tokens": 8, "messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]}).encode()
    req = urllib.request.Request(d.url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def _prefix_stats(d: Daemon) -> tuple[int, int]:
    with FerryClient(d.zmq_endpoint) as c:
        s = c.stats()["engines"][0]["models"]["smollm2:1"]
    return s["prefix_cache_query_tokens"], s["prefix_cache_hit_tokens"]


def test_shared_system_prompt_prefills_only_the_suffix(llm):
    first = _chat(llm, "Where is my parcel?")
    q0, h0 = _prefix_stats(llm)
    second = _chat(llm, "Where is my parcel?")
    q1, h1 = _prefix_stats(llm)
    prompt_tokens = second["usage"]["prompt_tokens"]
    assert prompt_tokens > 300
    hit = h1 - h0
    # every full block of the shared prompt is reused; at most a block and the last token run
    assert hit >= prompt_tokens - 17, (hit, prompt_tokens)
    assert q1 - q0 == prompt_tokens
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == hit
    assert second["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    # a different question after the same system prompt reuses the system prompt's blocks
    third = _chat(llm, "Can I change the delivery address?")
    _, h2 = _prefix_stats(llm)
    assert h2 - h1 >= len(SYSTEM) // 8   # the system prompt alone is hundreds of tokens
    assert third["usage"]["prompt_tokens_details"]["cached_tokens"] == h2 - h1
