"""Targets for the load generator: one class per way of sending a request (benchmarks/loadgen.py).

Every target raises on any failure — a non-2xx status, an error event inside a stream, a body
without the expected result — so the generator counts it as an error instead of a fast success.

- `HttpPost`: a fixed body POSTed to a URL (KServe v2 JSON or binary, and the tensor peers).
- `ZmqInfer`: Ferry's asyncio ZMQ client, tensors inline or through a registered shm region.
- `ChatStream`: OpenAI `/v1/chat/completions` with `stream: true` (Ferry, llama.cpp, the naive
  baseline); token arrivals are the SSE chunks carrying text, the count comes from `usage`.
- `WsStream`: Ferry's WebSocket `/v1/ws`, every request multiplexed on one socket.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Callable

import numpy as np

from benchmarks.loadgen import Outcome

__all__ = ["HttpPost", "ZmqInfer", "ChatStream", "WsStream", "TargetFailed",
           "kserve_json_body", "kserve_binary_body", "for_cli"]

_KSERVE_TYPES = {"int64": "INT64", "int32": "INT32", "float32": "FP32", "float64": "FP64",
                 "uint8": "UINT8", "bool": "BOOL", "float16": "FP16"}


class TargetFailed(RuntimeError):
    """The system under test answered, but not with a successful result."""


def kserve_json_body(inputs: dict[str, np.ndarray]) -> bytes:
    return json.dumps({"inputs": [
        {"name": n, "datatype": _KSERVE_TYPES[a.dtype.name], "shape": list(a.shape),
         "data": a.ravel().tolist()} for n, a in inputs.items()]}).encode()


def kserve_binary_body(inputs: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """The binary-data extension: a JSON header, then raw tensor bytes; outputs binary too."""
    head = json.dumps({"inputs": [
        {"name": n, "datatype": _KSERVE_TYPES[a.dtype.name], "shape": list(a.shape),
         "parameters": {"binary_data_size": a.nbytes}} for n, a in inputs.items()],
        "parameters": {"binary_data_output": True}}).encode()
    body = head + b"".join(np.ascontiguousarray(a).tobytes() for a in inputs.values())
    return body, {"Inference-Header-Content-Length": str(len(head)),
                  "Content-Type": "application/octet-stream"}


class _Http:
    """One aiohttp session per target, opened in the running loop."""

    # Streams last seconds, so a connection per request costs nothing measurable, and it avoids
    # reusing a keep-alive connection the server closed while idle (llama-server drops them
    # after 5 s), which fails the next POST with "Can not write request body".
    fresh_connections = False

    def __init__(self) -> None:
        self.session: Any = None

    async def open(self) -> None:
        import aiohttp
        # No per-host connection cap: an open-loop run may hold hundreds of requests at once.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=self.fresh_connections),
            timeout=aiohttp.ClientTimeout(total=None))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


class HttpPost(_Http):
    """POST `body` to `url`; success is a 2xx whose body contains `expect`."""

    streaming = False

    def __init__(self, name: str, url: str, body: bytes, *, headers: dict[str, str] | None = None,
                 expect: bytes = b"") -> None:
        super().__init__()
        self.name, self.url, self.body, self.expect = name, url, body, expect
        self.headers = headers or {"Content-Type": "application/json"}

    async def call(self, i: int) -> Outcome:
        async with self.session.post(self.url, data=self.body, headers=self.headers) as resp:
            data = await resp.read()
            if resp.status // 100 != 2:
                raise TargetFailed(f"HTTP {resp.status}: {data[:200]!r}")
        if self.expect and self.expect not in data[:4096]:
            raise TargetFailed(f"response lacks {self.expect!r}: {data[:200]!r}")
        return Outcome()


class ZmqInfer:
    """Ferry's AsyncFerryClient: inline frames, or inputs through a client shm region."""

    streaming = False

    def __init__(self, name: str, endpoint: str, model: str, inputs: dict[str, np.ndarray], *,
                 use_shm: bool = False, region_bytes: int = 64 << 20) -> None:
        self.name, self.endpoint, self.model, self.inputs = name, endpoint, model, inputs
        self.use_shm, self.region_bytes = use_shm, region_bytes
        self.client: Any = None

    async def open(self) -> None:
        from frontends.client import AsyncFerryClient
        self.client = AsyncFerryClient(self.endpoint, timeout_s=120.0)
        if self.use_shm:
            await self.client.register_region(f"bench-{uuid.uuid4().hex[:8]}", self.region_bytes)

    async def call(self, i: int) -> Outcome:
        out = await self.client.infer(self.model, self.inputs, use_shm=self.use_shm)
        if not out:
            raise TargetFailed("the reply holds no output tensor")
        return Outcome()

    async def close(self) -> None:
        if self.client is None:
            return
        region = self.client.region
        if region is not None:
            # Unregister while the client's reader still runs: AsyncFerryClient.close() cancels
            # its reader first and would then wait its whole timeout for this reply.
            from daemon import protocol as P
            try:
                await self.client._call(P.UnregisterRegion(uuid.uuid4().hex, region.name))
            finally:
                region.close()
                self.client.region = None
        await self.client.close()
        self.client = None


Messages = Callable[[int], list[dict[str, str]]]


class ChatStream(_Http):
    """OpenAI chat completions, streamed; `messages(i)` gives request i's conversation."""

    streaming = True
    fresh_connections = True

    def __init__(self, name: str, base_url: str, model: str, messages: Messages, *,
                 max_tokens: int, extra: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.name, self.url, self.model, self.messages = name, base_url + "/v1/chat/completions", \
            model, messages
        self.max_tokens, self.extra = max_tokens, extra or {}

    async def call(self, i: int) -> Outcome:
        body = {"model": self.model, "messages": self.messages(i), "max_tokens": self.max_tokens,
                "stream": True, "stream_options": {"include_usage": True}, **self.extra}
        out = Outcome()
        usage = None
        done = False
        async with self.session.post(self.url, json=body) as resp:
            if resp.status != 200:
                raise TargetFailed(f"HTTP {resp.status}: {(await resp.read())[:200]!r}")
            async for line in resp.content:
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    raise TargetFailed(f"error event: {chunk['error']}")
                usage = chunk.get("usage") or usage
                choices = chunk.get("choices") or ()
                if choices and (choices[0].get("delta") or {}).get("content"):
                    out.token_times.append(time.perf_counter())
        if not done:
            raise TargetFailed("the stream ended without [DONE]")
        out.tokens = int(usage["completion_tokens"]) if usage else len(out.token_times)
        if not out.token_times:
            raise TargetFailed("the stream carried no text")
        return out


class WsStream(_Http):
    """Ferry's WebSocket `/v1/ws`: every request multiplexed on one socket by id."""

    streaming = True

    def __init__(self, name: str, base_url: str, model: str, messages: Messages, *,
                 max_tokens: int, extra: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.name, self.url, self.model, self.messages = name, base_url + "/v1/ws", model, messages
        self.max_tokens, self.extra = max_tokens, extra or {}
        self.ws: Any = None
        self.queues: dict[str, asyncio.Queue] = {}
        self.reader: asyncio.Task | None = None

    async def open(self) -> None:
        await super().open()
        self.ws = await self.session.ws_connect(self.url, max_msg_size=1 << 24)
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            q = self.queues.get(data.get("id"))
            if q is not None:
                q.put_nowait((time.perf_counter(), data))
        for q in self.queues.values():                       # the socket closed under us
            q.put_nowait((time.perf_counter(), {"type": "error", "message": "socket closed"}))

    async def call(self, i: int) -> Outcome:
        rid = f"r{i}-{uuid.uuid4().hex[:6]}"
        q: asyncio.Queue = asyncio.Queue()
        self.queues[rid] = q
        out = Outcome()
        try:
            await self.ws.send_str(json.dumps({
                "type": "inference", "id": rid, "model": self.model,
                "messages": self.messages(i), "max_tokens": self.max_tokens, "stream": True,
                **self.extra}))
            while True:
                t, data = await q.get()
                kind = data.get("type")
                if kind == "token":
                    out.token_times.append(t)
                elif kind == "complete":
                    usage = data.get("usage") or {}
                    out.tokens = int(usage.get("completion_tokens", len(out.token_times)))
                    return out
                else:
                    raise TargetFailed(f"{kind}: {data.get('code')} {data.get('message')}")
        finally:
            self.queues.pop(rid, None)

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        if self.ws is not None:
            await self.ws.close()
        await super().close()


# -- the command line's targets: inputs made from the model's own metadata ---------------------

def example_inputs(meta: dict[str, Any], batch: int = 1, seq: int = 16) -> dict[str, np.ndarray]:
    """Deterministic inputs for a KServe model description: -1 dims become `batch` (first)
    or `seq`; integer inputs get small ids (valid token ids for text models)."""
    rng = np.random.default_rng(0)
    out = {}
    inv = {v: k for k, v in _KSERVE_TYPES.items()}
    for spec in meta["inputs"]:
        shape = [d if d >= 0 else (batch if k == 0 else seq) for k, d in enumerate(spec["shape"])]
        dtype = np.dtype(inv[spec["datatype"]])
        if dtype.kind in "iu":
            arr = (np.ones(shape, dtype) if "mask" in spec["name"]
                   else rng.integers(1000, 2000, size=shape).astype(dtype))
        else:
            arr = rng.random(shape, dtype=np.float32).astype(dtype) * 16
        out[spec["name"]] = arr
    return out


def _chat(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Request {i}: tell me a short story about a ferry."}]


async def for_cli(kind: str, *, url: str, zmq_endpoint: str, model: str,
                  max_tokens: int) -> Any:
    if kind in ("chat-sse", "ws"):
        cls = ChatStream if kind == "chat-sse" else WsStream
        return cls(kind, url, model, _chat, max_tokens=max_tokens,
                   extra={"temperature": 0, "ignore_eos": True})
    import aiohttp
    async with aiohttp.ClientSession() as s, s.get(f"{url}/v2/models/{model}") as resp:
        if resp.status != 200:
            raise TargetFailed(f"model {model!r}: HTTP {resp.status} {await resp.text()}")
        inputs = example_inputs(await resp.json())
    infer = f"{url}/v2/models/{model}/infer"
    if kind == "kserve-json":
        return HttpPost(kind, infer, kserve_json_body(inputs), expect=b'"outputs"')
    if kind == "kserve-binary":
        body, headers = kserve_binary_body(inputs)
        return HttpPost(kind, infer, body, headers=headers, expect=b'"outputs"')
    if not zmq_endpoint:
        raise SystemExit("--zmq ENDPOINT is needed for the zmq targets")
    return ZmqInfer(kind, zmq_endpoint, model, inputs, use_shm=kind == "zmq-shm")
