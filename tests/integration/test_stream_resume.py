"""Resumable streams against a real daemon (two HTTP workers sharing the port, auth on): a
client that drops its connection mid-stream reconnects with Last-Event-ID and gets exactly the
events it missed, from whichever worker its new connection lands on; nothing is regenerated;
the window, the per-key bound and bad ids give clear errors; the default stays cancel-on-
disconnect."""
from __future__ import annotations

import http.client
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import orphan_segments, wait_until
from tests.integration.secure_daemon import SecureDaemon, call, error_code

pytestmark = pytest.mark.timeout(240)

CONFIG = "[auth]\nrequired = true\n"
SERVER = "stream_resume_window_s = 8\nstream_resume_max_kb_per_key = 64\n"
TOKENS = 24


@pytest.fixture(scope="module")
def ferry(demo_models: Path, tmp_path_factory: pytest.TempPathFactory):
    repo = tensor_repo(demo_models, tmp_path_factory, ("smollm2",))
    d = SecureDaemon(repo, workers=2, env={"FERRY_TORCH_THREADS": "1"}, extra_config=CONFIG,
                     server_extra=SERVER)

    async def seed(state) -> dict[str, str]:
        return {"a": (await state.keys.create("a")).plaintext,
                "b": (await state.keys.create("b")).plaintext}
    d.keys = d.state(seed)
    d.start(timeout_s=180)
    yield d
    code = d.stop()
    assert code == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"


def _body(max_tokens: int = TOKENS, **opts: Any) -> dict[str, Any]:
    return {"model": "smollm2", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "deterministic": True, "stream": True,
            "messages": [{"role": "user", "content": "Tell me about lighthouses."}],
            "stream_options": {"resumable": True, **opts}}


class Stream:
    """A streamed request read event by event on its own connection."""

    def __init__(self, d: SecureDaemon, method: str, path: str, key: str,
                 body: dict | None = None, headers: dict[str, str] | None = None,
                 source: str | None = None) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60,
                                               source_address=(source, 0) if source else None)
        h = {"Authorization": f"Bearer {key}", **(headers or {})}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        self.conn.request(method, path, body=data, headers=h)
        self.resp = self.conn.getresponse()

    def events(self, limit: int | None = None) -> list[tuple[str | None, str]]:
        """(id, data) pairs, up to `limit` or the stream's [DONE] (the connection itself stays
        open: keep-alive)."""
        out: list[tuple[str | None, str]] = []
        event_id, data = None, None
        while limit is None or len(out) < limit:
            line = self.resp.fp.readline()
            if not line:
                break
            line = line.decode().rstrip("\r\n")
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                data = line[6:]
            elif line.strip() == "" and data is not None:
                out.append((event_id, data))
                if data == "[DONE]":
                    break
                event_id, data = None, None
        return out

    def close(self) -> None:
        self.conn.close()


def _text(events: list[tuple[str | None, str]]) -> str:
    out = []
    for _, data in events:
        if data == "[DONE]":
            continue
        for choice in json.loads(data).get("choices", []):
            out.append(choice["delta"].get("content") or "")
    return "".join(out)


def test_a_dropped_stream_resumes_with_what_it_missed_on_any_worker(ferry):
    key = ferry.keys["a"]
    whole = Stream(ferry, "POST", "/v1/chat/completions", key,
                   {**_body(), "stream_options": {}})
    reference = whole.events()
    whole.close()
    assert reference[-1][1] == "[DONE]" and all(i is None for i, _ in reference)

    first = Stream(ferry, "POST", "/v1/chat/completions", key, _body())
    assert first.resp.status == 200
    sid = first.resp.getheader("Ferry-Stream-Id")
    head = first.events(3)
    first.close()                                   # the connection drops mid-stream
    assert [i for i, _ in head] == [f"{sid}/1", f"{sid}/2", f"{sid}/3"]
    assert json.loads(head[0][1])["id"] == sid

    # reconnect from eight source addresses: the kernel spreads them over both workers, so
    # both the owner's own path and the relay from the other worker serve the rest
    for n in range(8):
        again = Stream(ferry, "POST", "/v1/chat/completions", key, {"ignored": True},
                       headers={"Last-Event-ID": f"{sid}/3"}, source=f"127.0.0.{2 + n}")
        assert again.resp.status == 200, again.resp.read()
        rest = again.events()
        again.close()
        assert rest[0][0] == f"{sid}/4" and rest[-1][1] == "[DONE]"
        assert _text(head + rest) == _text(reference), "the stream was not continued as is"
        assert [i for i, _ in rest] == [f"{sid}/{k}" for k in range(4, 4 + len(rest))]
    # GET /v1/streams/{id} from the start gives the very same events
    whole_again = Stream(ferry, "GET", f"/v1/streams/{sid}", key, source="127.0.0.11")
    replay = whole_again.events()
    whole_again.close()
    assert replay[:3] == head and _text(replay) == _text(reference)
    status, _, body = call(ferry, "GET", f"/v1/streams/{sid}?last_event_id=2", key=key)
    assert status == 200 and isinstance(body, str) and body.startswith(f"id: {sid}/3\n")


def test_another_key_cannot_resume_a_stream(ferry):
    first = Stream(ferry, "POST", "/v1/chat/completions", ferry.keys["a"], _body(4))
    sid = first.resp.getheader("Ferry-Stream-Id")
    first.events()
    first.close()
    for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"):
        status, _, body = call(ferry, "GET", f"/v1/streams/{sid}", key=ferry.keys["b"],
                               source=source)
        assert (status, error_code(body)) == (404, "unknown_stream"), body


@pytest.mark.parametrize("header, status, code", [
    ("nonsense", 400, "invalid_last_event_id"),
    ("chatcmpl-abc/x", 400, "invalid_last_event_id"),
    ("/5", 400, "invalid_last_event_id"),
    ("chatcmpl-" + "0" * 32 + "-0/1", 404, "unknown_stream"),
    ("chatcmpl-" + "0" * 32 + "-1/1", 404, "unknown_stream"),
    ("chatcmpl-" + "0" * 32 + "-7/1", 404, "unknown_stream"),      # no such worker
    ("no-worker-suffix/1", 404, "unknown_stream"),
])
def test_bad_last_event_ids_are_refused(ferry, header, status, code):
    for source in ("127.0.0.2", "127.0.0.3"):
        got, _, body = call(ferry, "POST", "/v1/chat/completions", key=ferry.keys["a"],
                            body=_body(), headers={"Last-Event-ID": header}, source=source)
        assert (got, error_code(body)) == (status, code), body


def test_an_event_never_sent_is_refused(ferry):
    first = Stream(ferry, "POST", "/v1/chat/completions", ferry.keys["a"], _body(4))
    sid = first.resp.getheader("Ferry-Stream-Id")
    sent = first.events()
    first.close()
    for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
        status, _, body = call(ferry, "GET", f"/v1/streams/{sid}", key=ferry.keys["a"],
                               headers={"Last-Event-ID": f"{sid}/{len(sent) + 1}"},
                               source=source)
        assert (status, error_code(body)) == (400, "invalid_last_event_id"), body
    status, _, body = call(ferry, "GET", f"/v1/streams/{sid}", key=ferry.keys["a"],
                           headers={"Last-Event-ID": f"other-0/{len(sent)}"})
    assert (status, error_code(body)) == (400, "invalid_last_event_id"), body
    status, _, body = call(ferry, "GET", f"/v1/streams/{sid}?last_event_id=-1",
                           key=ferry.keys["a"])
    assert (status, error_code(body)) == (400, "invalid_last_event_id"), body


@pytest.mark.parametrize("options, param", [
    ({"resumable": "yes"}, "stream_options.resumable"),
    ({"resumable": 1}, "stream_options.resumable"),
])
def test_bad_resumable_options(ferry, options, param):
    status, _, body = call(ferry, "POST", "/v1/chat/completions", key=ferry.keys["a"],
                           body={**_body(), "stream_options": options})
    assert status == 400 and body["error"]["param"] == param, body
    status, _, body = call(ferry, "POST", "/v1/completions", key=ferry.keys["a"], body={
        "model": "smollm2", "prompt": "x", "stream_options": {"resumable": True}})
    assert status == 400 and body["error"]["param"] == "stream_options", body


def _running(d: SecureDaemon) -> float:
    status, _, text = call(d, "GET", "/metrics", key=d.keys["a"])
    assert status == 200
    total = 0.0
    for line in text.splitlines():
        if line.startswith("vllm:num_requests_running"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _expired(d: SecureDaemon, probe) -> bool:
    """`probe(source)` asks for an event far past the end, which never attaches a reader: 400
    while the stream lives, 410 stream_expired once dropped (asked of both workers)."""
    codes = {probe(source) for source in ("127.0.0.2", "127.0.0.3")}
    assert codes <= {(400, "invalid_last_event_id"), (400, "invalid_parameter"),
                     (410, "stream_expired")}, codes
    return codes == {(410, "stream_expired")}


def test_an_unresumed_stream_expires_and_its_generation_is_cancelled(ferry):
    first = Stream(ferry, "POST", "/v1/chat/completions", ferry.keys["a"],
                   _body(max_tokens=1500))
    sid = first.resp.getheader("Ferry-Stream-Id")
    first.events(2)
    first.close()
    t0 = time.monotonic()

    def probe(source: str) -> tuple[int, str | None]:
        status, _, body = call(ferry, "GET", f"/v1/streams/{sid}", key=ferry.keys["a"],
                               headers={"Last-Event-ID": f"{sid}/999999"}, source=source)
        return status, error_code(body)
    assert not _expired(ferry, probe)             # it goes on while nobody reads
    wait_until(lambda: _expired(ferry, probe), 40, "the stream to expire", interval=0.3)
    assert time.monotonic() - t0 >= 7.5           # not before the 8 s window
    wait_until(lambda: _running(ferry) == 0, 30, "its generation to stop", interval=0.2)


def test_the_per_key_bound_ends_a_stream_with_an_error_event(ferry):
    # 64 KiB per key: a long stream nobody reads runs into it (top logprobs make an event
    # ~2 KiB, so that takes a few dozen tokens, not hundreds)
    first = Stream(ferry, "POST", "/v1/chat/completions", ferry.keys["b"],
                   {**_body(max_tokens=3000), "logprobs": True, "top_logprobs": 20})
    sid = first.resp.getheader("Ferry-Stream-Id")
    first.events(1)
    first.close()
    time.sleep(0.5)
    again = Stream(ferry, "GET", f"/v1/streams/{sid}", ferry.keys["b"],
                   headers={"Last-Event-ID": f"{sid}/1"})
    assert again.resp.status == 200
    rest = again.events()
    again.close()
    assert rest[-1][1] == "[DONE]"
    error = json.loads(rest[-2][1])
    assert error["error"]["code"] == "resume_buffer_full", error
    assert sum(len(d) for _, d in rest) < 80 * 1024
    wait_until(lambda: _running(ferry) == 0, 30, "the ended stream's generation to stop")


def test_a_plain_stream_still_cancels_on_disconnect(ferry):
    first = Stream(ferry, "POST", "/v1/chat/completions", ferry.keys["a"],
                   {**_body(max_tokens=4000), "stream_options": {}})
    assert first.resp.getheader("Ferry-Stream-Id") is None
    first.events(2)
    first.close()
    wait_until(lambda: _running(ferry) == 0, 10, "the plain stream to be cancelled",
               interval=0.1)


# -- WebSocket --------------------------------------------------------------------------------

def _ws(d: SecureDaemon, key: str, messages: list[dict], *, stop_after: int | None = None,
        source: str = "127.0.0.1", until_terminal: bool = True) -> list[dict]:
    """Send `messages` on a new socket and collect what comes back: `stop_after` messages
    (then the socket is closed under the stream), or up to the first terminal one."""
    import asyncio

    import aiohttp

    async def go() -> list[dict]:
        got: list[dict] = []
        connector = aiohttp.TCPConnector(local_addr=(source, 0))
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.ws_connect(f"http://127.0.0.1:{d.port}/v1/ws",
                                          headers={"Authorization": f"Bearer {key}"}) as ws:
                for m in messages:
                    await ws.send_str(json.dumps(m))
                async for frame in ws:
                    got.append(json.loads(frame.data))
                    if stop_after is not None and len(got) >= stop_after:
                        break
                    if until_terminal and got[-1]["type"] in ("complete", "error"):
                        break
        return got
    return asyncio.run(asyncio.wait_for(go(), 60))


def _ws_inference(rid: str, max_tokens: int = TOKENS, resumable: bool = True) -> dict:
    return {"type": "inference", "id": rid, "model": "smollm2", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "deterministic": True,
            "messages": [{"role": "user", "content": "Tell me about lighthouses."}],
            "resumable": resumable}


def test_a_websocket_request_resumes_on_another_socket(ferry):
    key = ferry.keys["a"]
    reference = _ws(ferry, key, [_ws_inference("ref", resumable=False)])
    want = "".join(m["token"] for m in reference if m["type"] == "token")
    assert reference[-1]["type"] == "complete" and reference[-1]["text"] == want

    head = _ws(ferry, key, [_ws_inference("r1")], stop_after=4)     # the socket drops
    assert head[0]["type"] == "stream" and head[0]["id"] == "r1"
    sid = head[0]["stream"]
    assert [m["event"] for m in head] == [1, 2, 3, 4]
    for n, source in enumerate(("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")):
        rest = _ws(ferry, key, [{"type": "resume", "stream": sid, "last_event": 4}],
                   source=source)
        assert [m["event"] for m in rest] == list(range(5, 5 + len(rest))), rest
        assert all(m["id"] == "r1" and m["stream"] == sid for m in rest)
        assert rest[-1]["type"] == "complete" and rest[-1]["text"] == want
        tokens = [m["token"] for m in head + rest if m["type"] == "token"]
        assert "".join(tokens) == want
    usage = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [rest[-1]["usage"][k] for k in usage] == [reference[-1]["usage"][k] for k in usage]


@pytest.mark.parametrize("message, status, code", [
    ({"type": "resume"}, 400, "invalid_parameter"),
    ({"type": "resume", "stream": 5}, 400, "invalid_parameter"),
    ({"type": "resume", "stream": "ws-x-0", "last_event": -1}, 400, "invalid_parameter"),
    ({"type": "resume", "stream": "ws-x-0", "last_event": True}, 400, "invalid_parameter"),
    ({"type": "resume", "stream": "ws-" + "0" * 32 + "-0"}, 404, "unknown_stream"),
    ({"type": "resume", "stream": "ws-" + "0" * 32 + "-9"}, 404, "unknown_stream"),
    ({**_ws_inference("x"), "resumable": "yes"}, 400, "invalid_parameter"),
])
def test_bad_websocket_resumes_are_refused(ferry, message, status, code):
    for source in ("127.0.0.2", "127.0.0.3"):
        (reply,) = _ws(ferry, ferry.keys["a"], [message], source=source)
        assert (reply["type"], reply["status"], reply["code"]) == ("error", status, code), reply


def test_streams_resume_only_through_their_own_kind_and_key(ferry):
    sse = Stream(ferry, "POST", "/v1/chat/completions", ferry.keys["a"], _body(4))
    sse_id = sse.resp.getheader("Ferry-Stream-Id")
    sse.events()
    sse.close()
    ws_id = _ws(ferry, ferry.keys["a"], [_ws_inference("k", max_tokens=4)])[0]["stream"]
    for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
        (reply,) = _ws(ferry, ferry.keys["a"], [{"type": "resume", "stream": sse_id}],
                       source=source)
        assert reply["code"] == "unknown_stream", reply
        (reply,) = _ws(ferry, ferry.keys["b"], [{"type": "resume", "stream": ws_id}],
                       source=source)
        assert reply["code"] == "unknown_stream", reply
        status, _, body = call(ferry, "GET", f"/v1/streams/{ws_id}", key=ferry.keys["a"],
                               source=source)
        assert (status, error_code(body)) == (404, "unknown_stream"), body


def test_an_unresumed_websocket_request_expires(ferry):
    head = _ws(ferry, ferry.keys["a"], [_ws_inference("long", max_tokens=1500)], stop_after=3)
    sid = head[0]["stream"]
    t0 = time.monotonic()

    def probe(source: str) -> tuple[int, str | None]:
        (reply,) = _ws(ferry, ferry.keys["a"], [{"type": "resume", "stream": sid,
                                                 "last_event": 999999}], source=source)
        return reply["status"], reply["code"]
    assert not _expired(ferry, probe)             # the socket is gone, the request is not
    wait_until(lambda: _expired(ferry, probe), 40, "the request to expire", interval=0.3)
    assert time.monotonic() - t0 >= 7.5
    wait_until(lambda: _running(ferry) == 0, 30, "its generation to stop", interval=0.2)
