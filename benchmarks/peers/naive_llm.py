"""The naive baseline: Ferry's own PyTorch model (engines.llm.model) served one request at a
time — no scheduler, no batching, no prefix cache — behind a minimal OpenAI streaming endpoint,
so the same load generator drives it. What continuous batching buys is Ferry minus this.

    python -m benchmarks.peers.naive_llm --gguf PATH --port 8100 [--threads 2]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch
from aiohttp import web

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from engines.llm.kv_cache import PagedKVCache  # noqa: E402
from engines.llm.model import ForwardBatch, LlamaModel, load_model  # noqa: E402
from engines.llm.tokenizer import IncrementalDecoder, Tokenizer  # noqa: E402

__all__ = ["NaiveGenerator", "main"]

log = logging.getLogger(__name__)
_BLOCK = 16


class NaiveGenerator:
    """Greedy decoding of one sequence at a time; its KV lives in blocks 0..n-1."""

    def __init__(self, model: LlamaModel, max_context: int) -> None:
        self.model = model
        self.max_context = min(max_context, model.cfg.max_context)
        blocks = -(-self.max_context // _BLOCK)
        self.kv = PagedKVCache(model.cfg, blocks, _BLOCK, model.dtype, model.device)
        self.table = list(range(blocks))
        self.eos = set(model.cfg.eos_ids)

    def _logits(self, ids: list[int], start: int) -> torch.Tensor:
        n = len(ids)
        batch = ForwardBatch(torch.tensor(ids, dtype=torch.int64),
                             torch.arange(start, start + n, dtype=torch.int64), [n],
                             [start + n], [self.table[:-(-(start + n) // _BLOCK)]])
        return self.model(batch, self.kv)[0]                              # [V]

    def generate(self, prompt: list[int], max_tokens: int, ignore_eos: bool) -> Iterator[int]:
        max_tokens = min(max_tokens, self.max_context - len(prompt))
        logits = self._logits(prompt, 0)
        pos = len(prompt)
        for _ in range(max(0, max_tokens)):
            token = int(torch.argmax(logits))
            yield token
            if token in self.eos and not ignore_eos:
                return
            logits = self._logits([token], pos)
            pos += 1


def _chunk(cid: str, model: str, delta: dict[str, Any], finish: str | None = None,
           usage: dict[str, int] | None = None) -> bytes:
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk",
                            "created": int(time.time()), "model": model,
                            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage is not None:
        body = {**body, "choices": [], "usage": usage}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class App:
    def __init__(self, gen: NaiveGenerator, tok: Tokenizer, name: str) -> None:
        self.gen, self.tok, self.name = gen, tok, name
        self.lock = asyncio.Lock()       # one request at a time: the whole point of the baseline

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        text = self.tok.apply_chat_template(body["messages"], add_generation_prompt=True)
        prompt = self.tok.encode(text)
        max_tokens = int(body.get("max_tokens") or 16)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        decoder = IncrementalDecoder(self.tok)
        produced = 0
        async with self.lock:
            steps = self.gen.generate(prompt, max_tokens, bool(body.get("ignore_eos")))
            while (token := await asyncio.to_thread(next, steps, None)) is not None:
                produced += 1
                piece = decoder.push([token])
                if piece:
                    await resp.write(_chunk(cid, self.name, {"content": piece}))
        await resp.write(_chunk(cid, self.name, {}, "length" if produced >= max_tokens
                                else "stop"))
        await resp.write(_chunk(cid, self.name, {}, usage={
            "prompt_tokens": len(prompt), "completion_tokens": produced,
            "total_tokens": len(prompt) + produced}))
        await resp.write(b"data: [DONE]\n\n")
        return resp


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.peers.naive_llm")
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--max-context", type=int, default=4096)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.gguf, weights="auto")      # the same kernels as the engine
    tok = Tokenizer.from_gguf(args.gguf)
    app = App(NaiveGenerator(model, args.max_context), tok, "smollm2")
    web_app = web.Application()
    web_app.router.add_get("/health", app.health)
    web_app.router.add_post("/v1/chat/completions", app.chat)
    web.run_app(web_app, host="127.0.0.1", port=args.port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
