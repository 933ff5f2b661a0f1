"""Cache-aware vs round-robin routing over three Ferry daemons, side by side in one run.

Three `ferry serve` daemons with the demo LLM (one HTTP worker, one torch thread each) behind
the real vllm-router (tests/integration/router_proc.py installs the pinned version into
.venv-router). For each policy a fresh router is started over the same daemons and the same
workload runs with its own K system prompts (so neither policy finds the other's blocks):
`--requests` streamed chat completions from `--concurrency` clients, each request one of the K
long system prompts (seeded random choice) plus a short question, `--max-tokens` tokens.

Measured per policy:
- prefix-cache hit ratio: the daemons' own vllm:prefix_cache_hits_total over
  vllm:prefix_cache_queries_total, summed over the three, during the run;
- TTFT (request sent → first content chunk, through the router) p50 / p99;
- throughput: requests and generated tokens per second of wall time;
- the spread: requests each daemon answered.

    python -m benchmarks.bench_router [--requests 48] [--concurrency 3] [--prompts 6]
                                      [--system-repeats 24] [--kv-cache-mb 64]
                                      [--max-tokens 8] [--policies cache_aware round_robin]

Each daemon's KV cache (`--kv-cache-mb`) holds about a third of the K prompts: cache-aware
routing gives each host its third; round robin shows every host every prompt.

Writes JSON to benchmarks/out/bench_router.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from daemon.demo import SMOLLM2_GGUF, smollm2_gguf  # noqa: E402
from tests.integration.daemon_proc import Daemon  # noqa: E402
from tests.integration.router_proc import (FAST_FAILOVER, ROUTER_VERSION, Router,  # noqa: E402
                                           router_binary)

TOPICS = ["shipping", "libraries", "astronomy", "gardening", "chemistry", "railways",
          "pottery", "sailing", "beekeeping", "weather", "cooking", "knitting"]


def system_prompt(topic: str, policy: str, repeats: int) -> str:
    """≈ 15 tokens per repeat; different from the others from its first word."""
    return (f"{topic.capitalize()} ({policy.replace('_', ' ')} desk) is the subject of every "
            "answer you give. "
            + f"Answer questions on {topic} politely and briefly, citing the house rules. "
            * repeats)


def make_repo(root: Path, kv_cache_mb: int) -> Path:
    version = root / "smollm2" / "1"
    version.mkdir(parents=True)
    (version / SMOLLM2_GGUF).symlink_to(smollm2_gguf().resolve())
    (version / "model.toml").write_text(
        f'engine = "llm"\nweights = "{SMOLLM2_GGUF}"\n[llm]\nkv_cache_mb = {kv_cache_mb}\n'
        "block_size = 16\nmax_num_seqs = 4\nmax_batched_tokens = 512\n")
    return root


def counters(d: Daemon) -> dict[str, float]:
    import urllib.request
    for _ in range(100):      # a scrape while the engine is busy may lack its families
        with urllib.request.urlopen(d.url + "/metrics", timeout=10) as resp:
            fams = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
        if "vllm:prefix_cache_hits" in fams:
            break
        time.sleep(0.1)
    else:
        raise RuntimeError(f"{d.url}/metrics never showed the LLM engine's stats")

    def total(family: str, sample: str, **labels: str) -> float:
        return sum(s.value for s in fams[family].samples if s.name == sample
                   and all(s.labels.get(k) == v for k, v in labels.items()))
    return {"hits": total("vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total"),
            "queries": total("vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total"),
            "chats": total("ferry_requests", "ferry_requests_total",
                           route="/v1/chat/completions", status="200")}


async def one(s: aiohttp.ClientSession, url: str, system: str, question: str,
              max_tokens: int) -> tuple[float, int, int]:
    """(TTFT s, tokens, status) of one streamed chat completion through the router."""
    body = {"model": "smollm2", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": question}]}
    t0 = time.perf_counter()
    ttft, tokens = float("nan"), 0
    async with s.post(url + "/v1/chat/completions", json=body) as r:
        if r.status != 200:
            await r.read()
            return ttft, 0, r.status
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice.get("delta", {}).get("content") and ttft != ttft:
                    ttft = time.perf_counter() - t0
    return ttft, tokens, 200


async def workload(url: str, systems: list[str], requests: int, concurrency: int,
                   max_tokens: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    plan = [(rng.randrange(len(systems)), i) for i in range(requests)]
    queue: asyncio.Queue = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    results: list[tuple[float, int, int]] = []

    async def client() -> None:
        async with aiohttp.ClientSession() as s:
            while not queue.empty():
                k, i = queue.get_nowait()
                results.append(await one(s, url, systems[k], f"Question {i}: when?",
                                         max_tokens))
    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r[2] == 200]
    ttfts = sorted(r[0] for r in ok)
    return {"wall_s": wall, "ok": len(ok), "failed": len(results) - len(ok),
            "ttft_p50_s": statistics.median(ttfts),
            "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(round(0.99 * (len(ttfts) - 1))))],
            "req_per_s": len(ok) / wall, "tok_per_s": sum(r[1] for r in ok) / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=6, help="K distinct system prompts")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--system-repeats", type=int, default=24,
                    help="length of each system prompt, ≈ 15 tokens per repeat")
    ap.add_argument("--kv-cache-mb", type=int, default=64,
                    help="per daemon: room for about a third of the K prompts, so a host "
                         "that sees them all evicts")
    ap.add_argument("--policies", nargs="+", default=["cache_aware", "round_robin"])
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    if args.prompts > len(TOPICS):
        ap.error(f"--prompts is at most {len(TOPICS)}")

    binary, why = router_binary()
    if binary is None:
        sys.exit(why)
    repo = make_repo(Path(tempfile.mkdtemp(prefix="bench-router-")), args.kv_cache_mb)
    hosts = [Daemon(repo, workers=1, env={"FERRY_TORCH_THREADS": "1"}) for _ in range(3)]
    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                       "platform": platform.platform(),
                                       "load_before": os.getloadavg()},
                           "router": f"vllm-router {ROUTER_VERSION}", "args": vars(args),
                           "policies": {}}
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda d: d.start(timeout_s=300), hosts))
        for policy in args.policies:
            systems = [system_prompt(t, policy, args.system_repeats)
                       for t in TOPICS[:args.prompts]]
            router = Router(binary, [d.url for d in hosts], policy=policy,
                            extra=FAST_FAILOVER).start()
            try:
                before = [counters(d) for d in hosts]
                res = asyncio.run(workload(router.url, systems, args.requests,
                                           args.concurrency, args.max_tokens, args.seed))
                after = [counters(d) for d in hosts]
            finally:
                router.stop()
            hits = sum(a["hits"] - b["hits"] for a, b in zip(after, before))
            queries = sum(a["queries"] - b["queries"] for a, b in zip(after, before))
            res.update(hit_ratio=hits / queries if queries else 0.0, hit_tokens=hits,
                       query_tokens=queries,
                       spread=[int(a["chats"] - b["chats"]) for a, b in zip(after, before)])
            out["policies"][policy] = res
            print(f"{policy}: {json.dumps(res)}", flush=True)
    finally:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda d: d.stop(check=False), hosts))
    out["machine"]["load_after"] = os.getloadavg()
    dest = REPO / "benchmarks" / "out"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "bench_router.json").write_text(json.dumps(out, indent=2))
    print()
    print("| policy | prefix-cache hit ratio | TTFT p50 | TTFT p99 | requests/s | tokens/s "
          "| requests per daemon | failed |")
    print("|---|---|---|---|---|---|---|---|")
    for policy, r in out["policies"].items():
        print(f"| {policy} | {r['hit_ratio']:.2f} ({int(r['hit_tokens'])} of "
              f"{int(r['query_tokens'])} tokens) | {r['ttft_p50_s'] * 1000:.0f} ms | "
              f"{r['ttft_p99_s'] * 1000:.0f} ms | {r['req_per_s']:.2f} | {r['tok_per_s']:.1f} | "
              f"{' / '.join(map(str, r['spread']))} | {r['failed']} |")


if __name__ == "__main__":
    main()
