"""Streaming latency through the HTTP frontend (SSE, WebSocket) vs the binary ZMQ path.

The same greedy completion (SmolLM2, fixed prompt, `max_tokens` tokens, EOS ignored) is streamed
three ways:

- `zmq`: `AsyncFerryClient.generate` with pre-tokenized ids — the engine's token stream through
  the thin ZMQ frontend (the reference);
- `sse`: POST /v1/completions with `stream: true` (tokenize, generate, detokenize, SSE chunks);
- `ws`: the same request as a WebSocket `inference` message on one open socket.

Two measurements:

1. Alone: each path by itself, `--requests` times, round-robin: time to first token (request
   sent → first text) and inter-token latency (mean gap per token after the first). These
   include the engine's step time and all of its noise.
2. Paired: the SSE and WebSocket requests run together with a zmq request in the same engine
   batch. The engine emits every sequence's token at the end of a step, so the arrival gap
   between a text piece and the zmq token of the same step is the HTTP frontend's latency per
   token relative to the ZMQ frontend's, free of step-time noise.

`--concurrency` runs that many streams of each path at once. Writes JSON to benchmarks/out/.

    python -m benchmarks.bench_streaming [--requests 20] [--max-tokens 32] [--concurrency 1 4]
"""
from __future__ import annotations

import argparse
import asyncio
import bisect
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.integration.daemon_proc import Daemon  # noqa: E402

PROMPT = "The history of the river ferry begins"


@dataclass(slots=True)
class Run:
    """One streamed request as the client saw it."""

    t0: float                           # request sent (perf_counter)
    arrivals: list[float] = field(default_factory=list)   # one per text piece / token message
    tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.arrivals[0] - self.t0

    @property
    def itl(self) -> float:
        return (self.arrivals[-1] - self.arrivals[0]) / max(1, self.tokens - 1)


def demo_repo() -> Path:
    """A repository holding only smollm2, linked from the demo models (built if missing)."""
    from daemon.demo import prepare_demo_models
    key = hashlib.sha256((REPO / "daemon" / "demo.py").read_bytes()).hexdigest()[:12]
    models = Path(os.environ.get("FERRY_TEST_MODELS", REPO / "var" / "test-models")) / key
    prepare_demo_models(models)
    root = Path(tempfile.mkdtemp(prefix="fybench"))
    (root / "smollm2").symlink_to(models / "smollm2", target_is_directory=True)
    return root


def prompt_ids(repo: Path) -> list[int]:
    from daemon.demo import SMOLLM2_GGUF
    from engines.llm.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(repo / "smollm2" / "1" / SMOLLM2_GGUF)
    return tok.encode(PROMPT, add_special_tokens=True)


async def via_zmq(client: Any, ids: list[int], params: dict[str, Any]) -> Run:
    run = Run(time.perf_counter())
    async for msg in client.generate("smollm2", ids, params):
        if msg.token_ids:
            run.arrivals.append(time.perf_counter())
            run.tokens += len(msg.token_ids)
    return run


async def via_sse(session: Any, url: str, body: dict[str, Any]) -> Run:
    run = Run(time.perf_counter())
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with session.post(url + "/v1/completions", json=body) as resp:
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                run.tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                run.arrivals.append(time.perf_counter())
    return run


async def via_ws(ws: Any, body: dict[str, Any], rid: str, inbox: asyncio.Queue) -> Run:
    run = Run(time.perf_counter())
    await ws.send_json({**body, "type": "inference", "id": rid})
    while True:
        msg = await inbox.get()
        if msg["type"] == "token":
            run.arrivals.append(time.perf_counter())
        elif msg["type"] == "complete":
            run.tokens = msg["usage"]["completion_tokens"]
            return run
        else:
            raise RuntimeError(f"websocket error: {msg}")


class WsMux:
    """One socket; replies routed to per-request queues by id."""

    def __init__(self, ws: Any) -> None:
        self.ws, self.queues = ws, {}
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            self.queues[data["id"]].put_nowait(data)

    def run(self, body: dict[str, Any], rid: str) -> Awaitable[Run]:
        self.queues[rid] = asyncio.Queue()
        return via_ws(self.ws, body, rid, self.queues[rid])


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, q))


def summarize(runs: list[Run]) -> dict[str, float]:
    ttft, itl = [r.ttft for r in runs], [r.itl for r in runs]
    return {"ttft_p50_ms": _pct(ttft, 50), "ttft_p90_ms": _pct(ttft, 90),
            "itl_p50_ms": _pct(itl, 50), "itl_p90_ms": _pct(itl, 90),
            "tokens_mean": float(statistics.fmean(r.tokens for r in runs)), "n": len(runs)}


def lags(runs: list[Run], refs: list[Run]) -> dict[str, float]:
    """How much later than the zmq stream each token of `runs` arrived, counting only tokens
    of the same engine step: the engine sends every sequence's token at the end of a step, so
    the gap to the nearest zmq arrival is the HTTP frontend's added latency relative to the ZMQ
    frontend's, free of step-time noise (it can be negative: both paths cross a frontend
    process). The zmq reference asks for more tokens so it spans every step of the others."""
    out = []
    for run, ref in zip(runs, refs):
        step = statistics.median(np.diff(ref.arrivals))
        for t in run.arrivals:
            i = bisect.bisect_left(ref.arrivals, t)
            near = min(ref.arrivals[max(0, i - 1):i + 1], key=lambda r: abs(t - r))
            if abs(t - near) < step / 2:
                out.append(t - near)
    if not out:
        return {}
    return {"lag_p50_ms": _pct(out, 50), "lag_p90_ms": _pct(out, 90),
            "lag_p99_ms": _pct(out, 99), "tokens": len(out)}


async def bench(url: str, zmq_endpoint: str, ids: list[int], requests: int, max_tokens: int,
                concurrency: list[int]) -> dict[str, Any]:
    import aiohttp

    from frontends.client import AsyncFerryClient

    params = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    body = {"model": "smollm2", "prompt": PROMPT, **params}
    zc = AsyncFerryClient(zmq_endpoint, timeout_s=120)
    results: dict[str, Any] = {"alone": {}, "paired": {}}
    counter = iter(range(1 << 30))
    async with aiohttp.ClientSession() as session, session.ws_connect(url + "/v1/ws") as ws:
        mux = WsMux(ws)
        ref_params = {**params, "max_tokens": max_tokens + 8}
        paths: dict[str, Callable[[], Awaitable[Run]]] = {
            "zmq": lambda: via_zmq(zc, ids, params),
            "sse": lambda: via_sse(session, url, body),
            "ws": lambda: mux.run(body, f"r{next(counter)}"),
        }
        for run in paths.values():               # warm every path once
            await run()
        for c in concurrency:
            alone: dict[str, list[Run]] = {name: [] for name in paths}
            paired: dict[str, list[Run]] = {name: [] for name in paths}
            for _ in range(requests):
                for name, run in paths.items():      # each path on its own
                    alone[name].extend(await asyncio.gather(*(run() for _ in range(c))))
                # every path at once, in the same engine batches
                ref = asyncio.ensure_future(via_zmq(zc, ids, ref_params))
                batch = await asyncio.gather(*(paths[name]() for name in ("sse", "ws")
                                               for _ in range(c)))
                paired["zmq"].extend([await ref] * c)
                paired["sse"].extend(batch[:c])
                paired["ws"].extend(batch[c:])
            results["alone"][c] = {name: summarize(r) for name, r in alone.items()}
            results["paired"][c] = {name: lags(paired[name], paired["zmq"])
                                    for name in ("sse", "ws")}
        mux.task.cancel()
    await zc.close()
    return results


def table(results: dict[str, Any]) -> str:
    lines = ["Each path alone (engine noise included):", "",
             "| streams | path | TTFT p50 (ms) | TTFT p90 (ms) | ITL p50 (ms) | ITL p90 (ms) |",
             "|---|---|---|---|---|---|"]
    for c, paths in results["alone"].items():
        for name, r in paths.items():
            lines.append(f"| {c} | {name} | {r['ttft_p50_ms']:.1f} | {r['ttft_p90_ms']:.1f} | "
                         f"{r['itl_p50_ms']:.2f} | {r['itl_p90_ms']:.2f} |")
    lines += ["", "Per-token lag behind the zmq stream, same engine step (frontend overhead):",
              "", "| streams per path | path | lag p50 (ms) | lag p90 (ms) | lag p99 (ms) | "
              "tokens |", "|---|---|---|---|---|---|"]
    for c, paths in results["paired"].items():
        for name, r in paths.items():
            if r:
                lines.append(f"| {c} | {name} | {r['lag_p50_ms']:+.2f} | "
                             f"{r['lag_p90_ms']:+.2f} | {r['lag_p99_ms']:+.2f} | {r['tokens']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20, help="requests per path and level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "streaming.json")
    args = ap.parse_args(argv)
    repo = demo_repo()
    ids = prompt_ids(repo)
    # One HTTP worker so SSE and WebSocket requests take the same path; one torch thread so
    # the engine's step time does not swing with OpenMP contention on a small machine.
    daemon = Daemon(repo, workers=1, env={"FERRY_TORCH_THREADS": "1"}).start()
    try:
        results = asyncio.run(bench(daemon.url, daemon.zmq_endpoint, ids, args.requests,
                                    args.max_tokens, args.concurrency))
    finally:
        code = daemon.stop()
    report = {"max_tokens": args.max_tokens, "requests": args.requests, "prompt": PROMPT,
              "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "results": results,
              "daemon_exit": code}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(table(results))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
