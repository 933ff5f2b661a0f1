"""Mid-stream failover against a real daemon: the engine is killed with SIGKILL while greedy
streams of a float SmolLM2 run (SSE chat and completions, WebSocket, a batch item, a seeded
sampling stream), and every stream continues on the restarted engine with exactly the tokens an
uninterrupted run gives: no error, nothing repeated or missing, usage counted once. A stream
that cannot be continued (its model was unloaded while the engine was down) ends with a clear
`engine_died` error event."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.daemon_proc import orphan_segments, wait_until
from tests.integration.secure_daemon import SecureDaemon, call

pytestmark = pytest.mark.timeout(300)

AUTH = "[auth]\nrequired = true\n"
MAX_TOKENS = 16
BATCH_TOKENS = 40
# structured output: the new engine re-advances the grammar over the delivered tokens
SCHEMA = {"type": "json_schema", "json_schema": {"name": "fruits", "schema": {
    "type": "object", "required": ["fruits"], "additionalProperties": False,
    "properties": {"fruits": {"type": "string", "minLength": 60, "maxLength": 80}}}}}
CHATS = [[{"role": "user", "content": "Write a short poem about the sea."}],
         [{"role": "user", "content": "List some fruits."}]]
PROMPTS = ["Once upon a time, in a small village,", "The three primary colors are"]
TPM = 200_000


@pytest.fixture(scope="module")
def ferry(demo_models: Path, tmp_path_factory: pytest.TempPathFactory):
    """smollm2 with float weights (its model.toml extended), auth on, one HTTP worker."""
    repo = tmp_path_factory.mktemp("repo")
    vdir = repo / "smollm2" / "1"
    vdir.mkdir(parents=True)
    for f in (demo_models / "smollm2" / "1").iterdir():
        if f.name != "model.toml":
            (vdir / f.name).symlink_to(f)
    toml = (demo_models / "smollm2" / "1" / "model.toml").read_text()
    assert toml.rstrip().splitlines()[-1].startswith("max_batched_tokens")   # [llm] is last
    # float weights, and batch-invariant steps: the continued run batches and prefills its
    # rows differently from the reference run, which must not move a greedy near-tie
    (vdir / "model.toml").write_text(toml + 'weight_format = "float"\ndeterministic = true\n')
    d = SecureDaemon(repo, workers=1, env={"FERRY_TORCH_THREADS": "1"},
                     extra_config=AUTH + "[repository]\ncontrol_mode = \"explicit\"\n")

    async def seed(state) -> dict[str, str]:
        return {"admin": (await state.keys.create("admin", scopes=["infer", "admin"])).plaintext,
                "user": (await state.keys.create("user", tpm=TPM)).plaintext}
    d.keys = d.state(seed)
    d.start(timeout_s=180)
    _ensure_loaded(d)
    yield d
    code = d.stop()
    assert code == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"


def _ensure_loaded(d: SecureDaemon) -> None:
    status, _, body = call(d, "POST", "/v2/repository/models/smollm2/load", key=d.keys["admin"],
                           body={})
    assert status == 200, body
    wait_until(lambda: call(d, "GET", "/v2/models/smollm2/ready",
                            key=d.keys["admin"])[0] == 200, 120, "smollm2 ready")


def _headers(d: SecureDaemon) -> dict[str, str]:
    return {"Authorization": f"Bearer {d.keys['user']}"}


def _chat(messages: list[dict], **kw: Any) -> dict[str, Any]:
    return {"model": "smollm2", "messages": messages, "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True, **kw}


def _completion(prompt: str, **kw: Any) -> dict[str, Any]:
    return {"model": "smollm2", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, **kw}


class SSE:
    """One streamed request, read event by event: the text so far, the events seen."""

    def __init__(self, path: str, body: dict[str, Any]) -> None:
        self.path = path
        self.body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        self.text = ""
        self.pieces = 0                 # events that carried text
        self.logprobs: list[float] = []
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None
        self.errors: list[Any] = []
        self.done = False

    async def run(self, s: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> None:
        async with s.post(url + self.path, json=self.body, headers=headers) as r:
            assert r.status == 200, await r.text()
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    self.done = True
                    break
                self._event(json.loads(data))

    def _event(self, ev: dict[str, Any]) -> None:
        if "error" in ev:
            self.errors.append(ev["error"])
            return
        if ev.get("usage"):
            self.usage = ev["usage"]
        for c in ev.get("choices", []):
            piece = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
            if piece:
                self.text += piece
                self.pieces += 1
            lp = c.get("logprobs")
            if lp and lp.get("content"):
                self.logprobs.extend(t["logprob"] for t in lp["content"])
            elif lp and lp.get("token_logprobs"):
                self.logprobs.extend(lp["token_logprobs"])
            if c.get("finish_reason"):
                self.finish = c["finish_reason"]


class WS:
    """One streamed request on /v1/ws: its token pieces and its terminal message."""

    def __init__(self, rid: str, body: dict[str, Any]) -> None:
        self.rid, self.body = rid, {**body, "type": "inference", "id": rid, "stream": True}
        self.text = ""
        self.pieces = 0
        self.terminal: dict[str, Any] | None = None

    async def run(self, s: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> None:
        async with s.ws_connect(url + "/v1/ws", headers=headers) as ws:
            await ws.send_str(json.dumps(self.body))
            while self.terminal is None:
                msg = await ws.receive(timeout=120)
                assert msg.type == aiohttp.WSMsgType.TEXT, msg
                ev = json.loads(msg.data)
                if ev["type"] == "token":
                    self.text += ev["token"]
                    self.pieces += 1
                elif ev["type"] in ("complete", "error"):
                    self.terminal = ev


def _run_all(d: SecureDaemon, streams: list, during=None, first=None) -> None:
    """Run `streams` concurrently; `during(streams)` (a coroutine) runs beside them. `first`,
    a coroutine function, is started before them and awaited with them, once
    `first.started()` (a coroutine) has returned."""
    async def main() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as s:
            tasks = []
            if first is not None:
                tasks.append(asyncio.create_task(first.run()))
                await first.started()
            tasks += [asyncio.create_task(x.run(s, d.url, _headers(d))) for x in streams]
            if during is not None:
                await during(streams)
            await asyncio.gather(*tasks)
    asyncio.run(asyncio.wait_for(main(), 200))


class Batch:
    """One /v1/batches job of one completion item, submitted and waited for."""

    def __init__(self, d: SecureDaemon, body: dict[str, Any]) -> None:
        self.d, self.body = d, body
        self.job: dict[str, Any] | None = None
        self.result: dict[str, Any] | None = None
        self.base = _generated_tokens(d)

    async def started(self) -> None:
        """Returns once the item is generating: its tokens count in the frontend's metrics
        (nothing else runs yet)."""
        deadline = time.monotonic() + 60
        while await asyncio.to_thread(_generated_tokens, self.d) < self.base + 2:
            assert time.monotonic() < deadline, "the batch item did not start"
            await asyncio.sleep(0.05)

    async def run(self) -> None:
        d = self.d
        line = {"custom_id": "item", "method": "POST", "url": "/v1/completions",
                "body": self.body}
        status, _, job = await asyncio.to_thread(
            call, d, "POST", "/v1/batches", key=d.keys["user"], raw=json.dumps(line).encode(),
            headers={"Content-Type": "application/jsonl"})
        assert status == 201, job
        deadline = time.monotonic() + 150
        while True:
            code, _, job = await asyncio.to_thread(call, d, "GET", f"/v1/batches/{job['id']}",
                                                   key=d.keys["user"])
            assert code == 200, job
            if job["ferry_status"] in ("completed", "failed", "cancelled"):
                break
            assert time.monotonic() < deadline, job
            await asyncio.sleep(0.1)
        self.job = job
        _, _, res = await asyncio.to_thread(call, d, "GET", f"/v1/batches/{job['id']}/results",
                                            key=d.keys["user"])
        [self.result] = res["data"]


def _kill_engine_when(d: SecureDaemon, ready, kills: list[dict]):
    """A `during` that kills the engine once `ready(streams)` holds, then waits for the new
    one; it records how many pieces each stream had at the kill."""
    async def during(streams: list) -> None:
        deadline = time.monotonic() + 90
        while not ready(streams):
            assert time.monotonic() < deadline, "the streams did not start"
            await asyncio.sleep(0.01)
        (pid,) = d.child_pids("engine")
        os.kill(pid, signal.SIGKILL)
        kills.append({"t": time.monotonic(), "pieces": [x.pieces for x in streams]})
    return during


def _counts(usage: dict[str, Any]) -> tuple[int, int, int]:
    return usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]


def _continued(d: SecureDaemon) -> int:
    return d.log().count("continuing stream")


def test_greedy_streams_continue_token_for_token_through_an_engine_kill(ferry):
    d = ferry
    def streams() -> list:
        return [SSE("/v1/chat/completions", _chat(CHATS[1], logprobs=True)),
                SSE("/v1/completions", _completion(PROMPTS[1], logprobs=1)),
                SSE("/v1/chat/completions", _chat(CHATS[0], temperature=1.0, top_p=0.9,
                                                  seed=1234)),
                SSE("/v1/chat/completions", _chat(CHATS[1], response_format=SCHEMA)),
                WS("w1", _completion(PROMPTS[0])),
                WS("w2", _chat(CHATS[1]))]
    item = _completion(PROMPTS[0], max_tokens=BATCH_TOKENS)
    reference = streams()
    t0 = time.monotonic()
    direct: list = []

    async def direct_item(_streams: list) -> None:   # the batch item's uninterrupted run
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as s:
            async with s.post(d.url + "/v1/completions", json=item, headers=_headers(d)) as r:
                assert r.status == 200, await r.text()
                direct.append(await r.json())
    _run_all(d, reference, direct_item)
    t_ref = time.monotonic() - t0
    for ref in reference:
        if isinstance(ref, SSE):
            assert ref.done and not ref.errors and ref.finish in ("length", "stop"), vars(ref)
            assert ref.usage["completion_tokens"] > 4, ref.usage
        else:
            assert ref.terminal["type"] == "complete", ref.terminal
    before, since = _continued(d), time.time()
    kills: list[dict] = []
    # a stop string from late in a reference text: the stop state carries across the kill
    stop = reference[1].text[-8:-3]
    stopped_ref = reference[1].text[:reference[1].text.index(stop)]
    runs = streams() + [SSE("/v1/completions", _completion(PROMPTS[1], stop=[stop]))]
    batch = Batch(d, item)      # started first, so it is mid-way (of 40 tokens) at the kill
    _run_all(d, runs, _kill_engine_when(d, lambda xs: all(x.pieces >= 2 for x in xs), kills),
             first=batch)
    t_after = time.monotonic() - kills[0]["t"]
    # every stream was mid-way when the engine died, and each was continued once
    assert all(0 < n < MAX_TOKENS for n in kills[0]["pieces"]), kills
    assert _continued(d) - before == len(runs) + 1, d.log()[-3000:]
    assert batch.job["ferry_status"] == "completed", batch.job
    out = batch.result["response"]["body"]
    assert batch.result["error"] is None, batch.result
    assert out["choices"][0]["text"] == direct[0]["choices"][0]["text"]
    assert _counts(out["usage"]) == _counts(direct[0]["usage"])
    got = runs[-1]
    assert not got.errors and got.finish == "stop" and got.text == stopped_ref, \
        (got.text, stop, stopped_ref)
    for ref, got in zip(reference, runs):
        if isinstance(ref, SSE):
            assert got.done and not got.errors, got.errors
            assert got.text == ref.text, (got.path, got.text, ref.text)
            # counted once: the original prompt, every delivered token (cached_tokens differ:
            # the reference run left its prompt in the prefix cache)
            assert got.finish == ref.finish and _counts(got.usage) == _counts(ref.usage), \
                (got.usage, ref.usage)
            assert len(got.logprobs) == len(ref.logprobs)
            assert got.logprobs == pytest.approx(ref.logprobs, abs=1e-3)
        else:
            assert got.terminal["type"] == "complete", got.terminal
            assert got.text == ref.text and got.terminal["text"] == ref.terminal["text"]
            assert _counts(got.terminal["usage"]) == _counts(ref.terminal["usage"])
    # the request log, which the key's tokens are settled from: one row per SSE stream, with
    # the original prompt and every delivered token
    sse = [("POST " + got.path, 200, got.usage["prompt_tokens"], got.usage["completion_tokens"])
           for got in runs if isinstance(got, SSE)]
    rows = wait_until(lambda: (lambda r: r if len(r) >= len(sse) else None)(
        _request_rows(d, since)), 30, "the request log rows")
    assert sorted(rows) == sorted(sse), rows
    print(f"\n{len(runs)} streams and a batch item through 1 engine kill: 0 failed, 0 token differences "
          f"(uninterrupted run {t_ref:.1f} s; kill to last token {t_after:.1f} s)")


def _request_rows(d: SecureDaemon, since: float) -> list[tuple]:
    import sqlite3
    with sqlite3.connect(d.state_dir / "ferry.db") as db:
        return db.execute("SELECT route, status, prompt_tokens, completion_tokens FROM "
                          "request_log WHERE ts >= ? AND route LIKE 'POST /v1/%completions' "
                          "ORDER BY id",
                          (since,)).fetchall()


def _generated_tokens(d: SecureDaemon) -> float:
    status, _, text = call(d, "GET", "/metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith("ferry_generation_tokens_total{") and 'model="smollm2"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_stream_whose_model_is_gone_ends_with_a_clear_error(ferry):
    """The engine dies mid-stream and the model is unloaded before it is back: the SSE and
    WebSocket streams end with engine_died naming why, never with silence or a hang."""
    d = ferry
    runs = [SSE("/v1/chat/completions", _chat(CHATS[0], max_tokens=200)),
            WS("gone", _completion(PROMPTS[0], max_tokens=200))]

    async def kill_and_unload(streams: list) -> None:
        await _kill_engine_when(d, lambda xs: all(x.pieces >= 1 for x in xs), [])(streams)
        status, _, body = await asyncio.to_thread(
            call, d, "POST", "/v2/repository/models/smollm2/unload", key=d.keys["admin"],
            body={})
        assert status == 200, body
    t0 = time.monotonic()
    try:
        _run_all(d, runs, kill_and_unload)
        sse, ws = runs
        assert sse.done and sse.finish is None and len(sse.errors) == 1, vars(sse)
        err = sse.errors[0]
        assert err["code"] == "engine_died" and "no longer served" in err["message"], err
        assert ws.terminal["type"] == "error" and ws.terminal["code"] == "engine_died", ws.terminal
        assert "no longer served" in ws.terminal["message"]
        assert time.monotonic() - t0 < 60
    finally:
        wait_until(lambda: d.child_pids("engine") and call(d, "GET", "/readyz")[0] == 200, 90,
                   "the engine restart")
        _ensure_loaded(d)
