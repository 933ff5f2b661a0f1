"""The load signals LLM routers read, on a real daemon with the demo LLM and two HTTP workers:
vLLM's metric names on `/metrics` (values checked against known load) and the ORCA
`endpoint-load-metrics` header on completions that ask for it."""
from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.demo import SMOLLM2_GGUF, smollm2_gguf
from tests.integration.daemon_proc import Daemon, wait_until

pytestmark = pytest.mark.timeout(60)

MAX_NUM_SEQS = 2        # so a third concurrent generation waits in the engine's queue
BLOCK_SIZE = 16
SYSTEM = ("You are a meticulous assistant for a shipping company. " * 12).strip()
ORCA_TEXT = re.compile(r"^TEXT named_metrics\.kv_cache_usage_perc=([0-9.e-]+), "
                       r"named_metrics\.num_requests_waiting=([0-9.]+)$")


def llm_repo(root: Path, kv_cache_mb: int = 64) -> Path:
    """The demo SmolLM2 with a small batch and KV cache, so queueing and KV use show."""
    version = root / "smollm2" / "1"
    version.mkdir(parents=True)
    (version / SMOLLM2_GGUF).symlink_to(smollm2_gguf().resolve())
    (version / "model.toml").write_text(
        f'engine = "llm"\nweights = "{SMOLLM2_GGUF}"\n[llm]\nkv_cache_mb = {kv_cache_mb}\n'
        f"block_size = {BLOCK_SIZE}\nmax_num_seqs = {MAX_NUM_SEQS}\nmax_batched_tokens = 512\n")
    return root


@pytest.fixture(scope="module")
def llm(demo_models, tmp_path_factory):
    d = Daemon(llm_repo(tmp_path_factory.mktemp("repo")), workers=2,
               env={"FERRY_TORCH_THREADS": "1"}).start(timeout_s=180)
    yield d
    assert d.stop() == 0, d.log()[-4000:]


# -- helpers --------------------------------------------------------------------------------------

def scrape(d: Daemon) -> dict:
    with urllib.request.urlopen(d.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict, family: str, sample: str | None = None, **labels: str) -> float:
    sample = sample or family
    return sum(s.value for s in fams[family].samples
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


def body(prompt: str, max_tokens: int, **extra) -> dict:
    return {"model": "smollm2", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, **extra}


async def complete(prompt: str, max_tokens: int, url: str) -> dict:
    # a connection per request, so SO_REUSEPORT spreads them over both workers
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        async with s.post(url + "/v1/completions", json=body(prompt, max_tokens)) as r:
            assert r.status == 200, await r.text()
            return await r.json()


class Streams:
    """`n` streaming generations held open (their headers received, so all are submitted)."""

    def __init__(self, url: str, n: int, max_tokens: int) -> None:
        self.url, self.n, self.max_tokens = url, n, max_tokens
        self.sessions: list[aiohttp.ClientSession] = []
        self.responses: list[aiohttp.ClientResponse] = []

    async def __aenter__(self) -> Streams:
        async def one(i: int) -> None:
            s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
            self.sessions.append(s)
            r = await s.post(self.url + "/v1/completions", json=body(
                f"Stream {i}: tell a long story.", self.max_tokens, stream=True))
            assert r.status == 200
            self.responses.append(r)
        await asyncio.gather(*(one(i) for i in range(self.n)))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for r in self.responses:
            r.close()           # the daemon cancels the generation and frees its blocks
        for s in self.sessions:
            await s.close()


async def poll(what: str, cond, timeout_s: float = 20.0):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        got = await asyncio.to_thread(cond)
        if got:
            return got
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def idle(d: Daemon) -> dict | None:
    fams = scrape(d)
    busy = value(fams, "vllm:num_requests_running") + value(fams, "vllm:num_requests_waiting")
    return fams if busy == 0 else None


# -- tests ----------------------------------------------------------------------------------------

def test_families_have_vllm_names_types_and_labels(llm):
    fams = scrape(llm)
    types = {"vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
             "vllm:kv_cache_usage_perc": "gauge", "vllm:gpu_cache_usage_perc": "gauge",
             "vllm:cache_config_info": "gauge", "vllm:prompt_tokens": "counter",
             "vllm:generation_tokens": "counter", "vllm:prefix_cache_queries": "counter",
             "vllm:prefix_cache_hits": "counter", "vllm:gpu_prefix_cache_hits": "counter",
             "vllm:gpu_prefix_cache_queries": "counter",
             "vllm:time_to_first_token_seconds": "histogram",
             "vllm:inter_token_latency_seconds": "histogram",
             "vllm:e2e_request_latency_seconds": "histogram"}
    for name, kind in types.items():
        assert fams[name].type == kind, name
        assert {s.labels["model_name"] for s in fams[name].samples} == {"smollm2"}, name
    info = fams["vllm:cache_config_info"].samples
    assert len(info) == 1 and info[0].value == 1
    blocks = value(fams, "ferry_kv_cache_blocks_total", model="smollm2")
    assert info[0].labels["block_size"] == str(BLOCK_SIZE)
    assert info[0].labels["num_gpu_blocks"] == str(int(blocks)) and blocks > 0
    text = urllib.request.urlopen(llm.url + "/metrics", timeout=10).read().decode()
    assert "vllm:prompt_tokens_total{" in text          # the sample name routers query
    assert 'vllm:time_to_first_token_seconds_bucket{engine=' in text


def test_token_counts_and_latencies_match_known_load(llm):
    before = wait_until(lambda: idle(llm), 30, "an idle engine")
    prompts = [f"Request number {i} asks about parcels." for i in range(4)]
    max_tokens = [3, 5, 7, 9]

    async def run() -> list[dict]:
        return list(await asyncio.gather(*(complete(p, n, llm.url)
                                           for p, n in zip(prompts, max_tokens))))
    answers = asyncio.run(run())
    prompt_total = sum(a["usage"]["prompt_tokens"] for a in answers)
    gen_total = sum(a["usage"]["completion_tokens"] for a in answers)
    assert gen_total == sum(max_tokens)
    # every scrape, whichever worker answers it, sees the same engine counters
    scrapes = [scrape(llm) for _ in range(6)]
    for after in scrapes:
        def delta(family: str, sample: str | None = None) -> float:
            return value(after, family, sample) - value(before, family, sample)
        assert delta("vllm:prompt_tokens", "vllm:prompt_tokens_total") == prompt_total
        assert delta("vllm:generation_tokens", "vllm:generation_tokens_total") == gen_total
        assert delta("vllm:prefix_cache_queries",
                     "vllm:prefix_cache_queries_total") == prompt_total
        assert delta("vllm:gpu_prefix_cache_queries",
                     "vllm:gpu_prefix_cache_queries_total") == prompt_total
        assert delta("vllm:time_to_first_token_seconds",
                     "vllm:time_to_first_token_seconds_count") == len(prompts)
        assert delta("vllm:e2e_request_latency_seconds",
                     "vllm:e2e_request_latency_seconds_count") == len(prompts)
        # one inter-token gap per token after each request's first
        assert delta("vllm:inter_token_latency_seconds",
                     "vllm:inter_token_latency_seconds_count") == gen_total - len(prompts)
        e2e_sum = delta("vllm:e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds_sum")
        ttft_sum = delta("vllm:time_to_first_token_seconds",
                         "vllm:time_to_first_token_seconds_sum")
        assert 0 < ttft_sum < e2e_sum < 4 * 30


def test_prefix_hits_count_the_cached_tokens_of_a_repeated_prompt(llm):
    prompt = SYSTEM + " Where is my parcel?"
    asyncio.run(complete(prompt, 2, llm.url))
    before = wait_until(lambda: idle(llm), 30, "an idle engine")
    again = asyncio.run(complete(prompt, 2, llm.url))
    after = scrape(llm)
    n = again["usage"]["prompt_tokens"]
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    hits = (value(after, "vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total")
            - value(before, "vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total"))
    queries = (value(after, "vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total")
               - value(before, "vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total"))
    prompt = (value(after, "vllm:prompt_tokens", "vllm:prompt_tokens_total")
              - value(before, "vllm:prompt_tokens", "vllm:prompt_tokens_total"))
    assert n > 100
    assert queries == n
    assert prompt == n          # vLLM counts the whole prompt, its cached part included
    # every full block but the one holding the last prompt token comes from the cache
    assert hits == cached == (n - 1) // BLOCK_SIZE * BLOCK_SIZE


def test_running_waiting_and_kv_usage_while_requests_are_in_flight(llm):
    async def run() -> None:
        async with Streams(llm.url, MAX_NUM_SEQS + 2, max_tokens=400):
            def loaded() -> dict | None:
                fams = scrape(llm)
                return fams if value(fams, "vllm:num_requests_running") == MAX_NUM_SEQS else None
            fams = await poll("a full running batch", loaded)
            assert value(fams, "vllm:num_requests_waiting") == 2
            assert value(fams, "ferry_llm_waiting_sequences", model="smollm2") == 2
            kv = value(fams, "vllm:kv_cache_usage_perc")
            used = value(fams, "ferry_kv_cache_blocks_used", model="smollm2")
            total = value(fams, "ferry_kv_cache_blocks_total", model="smollm2")
            assert 0 < kv < 1
            assert kv == value(fams, "vllm:gpu_cache_usage_perc")
            # two running sequences hold at least their prompt blocks; the same scrape's pool
            assert kv == pytest.approx(used / total)
    asyncio.run(run())
    wait_until(lambda: idle(llm), 30, "the cancelled streams to leave the engine")
    fams = scrape(llm)
    assert value(fams, "vllm:kv_cache_usage_perc") == 0


def test_orca_header_reports_queue_and_kv_usage_when_asked(llm):
    async def probe(path: str, headers: dict, stream: bool = False) -> tuple[int, str | None]:
        payload = (body("Hello", 2, stream=stream) if path.endswith("/completions")
                   and "chat" not in path else
                   {"model": "smollm2", "max_tokens": 2, "stream": stream,
                    "messages": [{"role": "user", "content": "Hello"}]})
        async with aiohttp.ClientSession() as s:
            r = await s.post(llm.url + path, json=payload, headers=headers)
            head = r.headers.get("endpoint-load-metrics")
            if stream:
                r.close()       # the headers are what counts; the generation is cancelled
            else:
                await r.read()
            return r.status, head

    def queued(n: int) -> bool:
        return value(scrape(llm), "vllm:num_requests_waiting") == n

    async def run() -> None:
        # idle: nothing waits, nothing held
        wait_until(lambda: idle(llm), 30, "an idle engine")
        status, head = await probe("/v1/completions", {"endpoint-load-metrics-format": "TEXT"})
        assert status == 200 and head is not None
        m = ORCA_TEXT.match(head)
        assert m, head
        assert float(m[1]) == 0.0 and float(m[2]) == 0.0
        status, head = await probe("/v1/chat/completions", {})
        assert status == 200 and head is None          # only when asked
        async with Streams(llm.url, MAX_NUM_SEQS + 2, max_tokens=400):
            await poll("a full running batch", lambda: value(
                scrape(llm), "vllm:num_requests_running") == MAX_NUM_SEQS)
            # a streamed chat gets its report with its headers: it waits behind the two queued
            status, head = await probe("/v1/chat/completions",
                                       {"endpoint-load-metrics-format": "TEXT"}, stream=True)
            m = ORCA_TEXT.match(head or "")
            assert status == 200 and m, head
            assert float(m[2]) == 3.0 and 0 < float(m[1]) < 1
            await poll("the closed probe to leave the queue", lambda: queued(2))
            status, head = await probe("/v1/chat/completions",
                                       {"endpoint-load-metrics-format": "JSON"}, stream=True)
            assert head is not None and head.startswith("JSON ")
            named = json.loads(head[5:])["named_metrics"]
            assert named["num_requests_waiting"] == 3.0
            assert 0 < named["kv_cache_usage_perc"] < 1
    asyncio.run(run())
