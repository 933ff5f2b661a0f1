"""Attacks on resumable streams (frontends/http/resume.py): ids that parse oddly, readers that
never read (locally and through the relay between workers), a relay that falls behind while
another one runs, and SIGTERM with retained and stalled streams. A real daemon (two HTTP
workers sharing the port, auth on) and, for the relay, the real forwarder over ZeroMQ ipc."""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import time
import urllib.parse
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio

from frontends.http import resume
from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import orphan_segments, wait_until
from tests.integration.secure_daemon import SecureDaemon, call, error_code

pytestmark = pytest.mark.timeout(240)

WINDOW_S = 3
GRACE_S = 6                      # the daemon's drain_grace_s: the SIGTERM test waits it out
CONFIG = "[auth]\nrequired = true\n"
SERVER = f"stream_resume_window_s = {WINDOW_S}\nstream_resume_max_kb_per_key = 16384\n"
SOURCES = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")


@pytest.fixture(scope="module")
def ferry(demo_models: Path, tmp_path_factory: pytest.TempPathFactory):
    repo = tensor_repo(demo_models, tmp_path_factory, ("smollm2",))
    d = SecureDaemon(repo, workers=2, env={"FERRY_TORCH_THREADS": "1"}, extra_config=CONFIG,
                     server_extra=SERVER, drain_grace_s=GRACE_S)

    async def seed(state) -> dict[str, str]:
        return {"a": (await state.keys.create("a")).plaintext}
    d.keys = d.state(seed)
    d.start(timeout_s=180)
    yield d
    code = d.stop()
    assert code == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"


def _body(max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": "smollm2", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "deterministic": True, "stream": True,
            "messages": [{"role": "user", "content": "Tell me about lighthouses."}],
            "stream_options": {"resumable": True}, **extra}


def _raw(d: SecureDaemon, method: str, path: str, headers: dict[str, bytes | str],
         body: bytes | None = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        payload = resp.read()
        try:
            return resp.status, json.loads(payload)
        except ValueError:
            return resp.status, payload
    finally:
        conn.close()


def test_non_ascii_digits_in_stream_ids_are_refused_not_500(ferry):
    """'²' and '٣' are str.isdigit() but int() refuses '²': each place an id or an event number
    is parsed answers its 4xx, never a 500."""
    auth = f"Bearer {ferry.keys['a']}"
    for bad in ("\u00b2", "\u0663", "1\u00b2"):
        value = f"chatcmpl-{'0' * 32}-0/{bad}".encode()
        for path in ("/v1/chat/completions", "/v1/streams/x-0"):
            status, body = _raw(ferry, "POST" if "chat" in path else "GET", path,
                                {"Authorization": auth, "Last-Event-ID": value,
                                 "Content-Type": "application/json"},
                                b"{}" if "chat" in path else None)
            assert (status, error_code(body)) == (400, "invalid_last_event_id"), (bad, body)
        status, body = _raw(ferry, "GET", "/v1/streams/x-0?last_event_id=" + urllib.parse.quote(bad),
                            {"Authorization": auth})
        assert (status, error_code(body)) == (400, "invalid_last_event_id"), (bad, body)
        for tail in (f"-{bad}", f"-0{bad}"):
            sid = f"chatcmpl-{'0' * 32}{tail}"
            status, body = _raw(ferry, "GET", "/v1/streams/" + urllib.parse.quote(sid),
                                {"Authorization": auth})
            assert status == 404, body
            status, body = _raw(ferry, "POST", "/v1/chat/completions",
                                {"Authorization": auth, "Content-Type": "application/json",
                                 "Last-Event-ID": f"{sid}/1".encode()}, b"{}")
            assert (status, error_code(body)) == (404, "unknown_stream"), (sid, body)
            (reply,) = _ws(ferry, [{"type": "resume", "stream": sid}])
            assert (reply["type"], reply["code"]) == ("error", "unknown_stream"), reply


def _ws(d: SecureDaemon, messages: list[dict], source: str = "127.0.0.1") -> list[dict]:
    import aiohttp

    async def go() -> list[dict]:
        got: list[dict] = []
        connector = aiohttp.TCPConnector(local_addr=(source, 0))
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.ws_connect(
                    f"http://127.0.0.1:{d.port}/v1/ws",
                    headers={"Authorization": f"Bearer {d.keys['a']}"}) as ws:
                for m in messages:
                    await ws.send_str(json.dumps(m))
                async for frame in ws:
                    if frame.type != aiohttp.WSMsgType.TEXT:
                        break
                    got.append(json.loads(frame.data))
                    if got[-1]["type"] in ("complete", "error"):
                        break
        return got
    return asyncio.run(asyncio.wait_for(go(), 30))


class Stalled:
    """An HTTP request on a socket with a tiny receive buffer whose reader stops after the
    response headers: the server's writes block once the socket buffers are full."""

    def __init__(self, d: SecureDaemon, method: str, path: str, body: dict | None = None,
                 headers: dict[str, str] | None = None, source: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.bind((source, 0))
        self.sock.settimeout(30)
        self.sock.connect(("127.0.0.1", d.port))
        data = json.dumps(body).encode() if body is not None else b""
        head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{d.port}",
                f"Authorization: Bearer {d.keys['a']}", f"Content-Length: {len(data)}",
                "Content-Type: application/json"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        got = b""
        while b"\r\n\r\n" not in got:
            got += self.sock.recv(1)       # the headers only, byte by byte, then no more
        self.head = got.decode()

    def header(self, name: str) -> str | None:
        for line in self.head.split("\r\n")[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == name.lower():
                return v.strip()
        return None

    def close(self) -> None:
        self.sock.close()


def _running(d: SecureDaemon) -> float:
    status, _, text = call(d, "GET", "/metrics", key=d.keys["a"])
    assert status == 200
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:num_requests_running"))


def _state(d: SecureDaemon, sid: str) -> set[tuple[int, str | None]]:
    """Asks both workers for an event far past the end (which attaches no reader)."""
    out = set()
    for source in ("127.0.0.2", "127.0.0.3"):
        status, _, body = call(d, "GET", f"/v1/streams/{sid}", key=d.keys["a"],
                               headers={"Last-Event-ID": f"{sid}/999999"}, source=source)
        out.add((status, error_code(body)))
    assert out <= {(400, "invalid_last_event_id"), (410, "stream_expired")}, out
    return out


BIG = {"logprobs": True, "top_logprobs": 20, "n": 8}   # ~2 KiB an event, 8 a step: the
                                                        # ~4 MiB socket buffers fill


def test_a_reader_that_never_reads_does_not_hold_its_stream_forever(ferry):
    """The original connection and resumed ones (local and relayed) stop reading: the
    generation still runs to its end into the buffer, and the readers count as gone once they
    take nothing for the window, so the stream expires and frees the key's retention."""
    first = Stalled(ferry, "POST", "/v1/chat/completions", _body(320, **BIG))
    sid = first.header("Ferry-Stream-Id")
    assert sid and first.head.startswith("HTTP/1.1 200"), first.head
    resumed = [Stalled(ferry, "GET", f"/v1/streams/{sid}", source=s) for s in SOURCES]
    t0 = time.monotonic()
    try:
        # before the fix the stalled writers stayed attached: the stream never expired
        wait_until(lambda: _state(ferry, sid) == {(410, "stream_expired")}, 120,
                   "the stalled stream to expire", interval=0.5)
        assert time.monotonic() - t0 >= 2 * WINDOW_S - 0.5     # a stall, then the window
        wait_until(lambda: _running(ferry) == 0, 30, "its generation to stop", interval=0.3)
    finally:
        for s in [first, *resumed]:
            s.close()


# -- the relay between workers, on real ZeroMQ sockets ----------------------------------------

def test_a_relay_behind_its_peers_is_not_cut_short(tmp_path):
    """A reader worker whose relay falls more than the socket's high-water mark behind while
    another relay from the same owner is live gets every event and the end (the forwarder's
    send met EAGAIN from ROUTER_MANDATORY and the tail ended silently: the reader waited
    forever after 2000 of 20000 events)."""
    endpoint = f"ipc://{tmp_path}/r.sock"
    assert len(endpoint) < 100

    async def go() -> tuple[int, bytes]:
        ctx = zmq.asyncio.Context()
        store = resume.StreamStore(0, 60, 1 << 30, 2)
        behind = store.create("ws-a-0", "k", sse=False)
        for i in range(20000):
            behind.append(b"%d" % i)
        behind.finish()
        live = store.create("ws-b-0", "k", sse=False)
        forwarder = resume._Forwarder(ctx, endpoint, store)
        forwarder.start()
        serving = asyncio.ensure_future(forwarder.serve())
        slow, fast = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
        try:
            for sock, sid in ((slow, "ws-a-0"), (fast, "ws-b-0")):
                sock.connect(endpoint)
                await sock.send(msgpack.packb({"op": "tail", "sid": sid, "start": 0,
                                               "owner": "k", "sse": False}))
                if sock is slow:
                    await asyncio.sleep(0.5)     # its pipes fill while nobody reads
            assert await fast.recv_multipart() == [b"ok"]
            live.append(b"x")
            assert await fast.recv_multipart() == [b"ev", b"x"]
            await asyncio.sleep(0.5)
            got, last = 0, b""
            while await slow.poll(5000):
                frames = await slow.recv_multipart()
                last = frames[0]
                if last == b"ev":
                    assert frames[1] == b"%d" % got
                    got += 1
                elif last == b"end":
                    break
            return got, last
        finally:
            serving.cancel()
            forwarder.close()
            slow.close(0)
            fast.close(0)
            ctx.term()
    got, last = asyncio.run(asyncio.wait_for(go(), 60))
    assert (got, last) == (20000, b"end")


def _http_worker_pid(d: SecureDaemon, worker: int) -> int:
    for pid in d.child_pids("http"):
        args = json.loads(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[4])
        if args.get("worker") == worker:
            return pid
    raise AssertionError(f"no HTTP worker {worker}")


def test_a_relay_whose_owner_worker_dies_is_dropped_not_left_waiting(ferry):
    """Readers of a stream, some relayed from the other worker; its owner is killed: every
    reader's connection ends (the relayed ones once the owner's heartbeat stops) instead of
    waiting forever for events that cannot come."""
    first = Stalled(ferry, "POST", "/v1/chat/completions", _body(3000))
    sid = first.header("Ferry-Stream-Id")
    first.close()
    assert sid is not None
    readers = []
    for source in [f"127.0.0.{k}" for k in range(2, 10)]:
        conn = http.client.HTTPConnection("127.0.0.1", ferry.port, timeout=40,
                                          source_address=(source, 0))
        conn.request("GET", f"/v1/streams/{sid}",
                     headers={"Authorization": f"Bearer {ferry.keys['a']}"})
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.readline().startswith(f"id: {sid}/1".encode())
        readers.append((conn, resp))
    victim = _http_worker_pid(ferry, int(sid.rsplit("-", 1)[1]))
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    ends = []
    for conn, resp in readers:
        try:
            while resp.readline():
                pass
            ends.append(time.monotonic() - t0)
        except (ConnectionError, http.client.IncompleteRead):
            ends.append(time.monotonic() - t0)
        except TimeoutError:
            raise AssertionError("a reader was left waiting after its owner died") from None
        finally:
            conn.close()
    assert max(ends) < 30, ends
    wait_until(lambda: len(ferry.child_pids("http")) == 2
               and victim not in ferry.child_pids("http"), 60, "the worker to be restarted")
    wait_until(lambda: call(ferry, "GET", "/readyz")[0] == 200, 60, "ready again")


def test_sigterm_with_retained_and_stalled_streams_exits_0_within_the_grace(ferry):
    """Last in the module: a stream nobody reads, one whose reader stalled and one whose reader
    waits on the live stream; SIGTERM exits 0 within the drain grace."""
    unread = Stalled(ferry, "POST", "/v1/chat/completions", _body(2000))
    unread.close()
    stalled = Stalled(ferry, "POST", "/v1/chat/completions", _body(2000, **BIG))
    live = Stalled(ferry, "POST", "/v1/chat/completions", _body(2000))
    waiting = [Stalled(ferry, "GET", f"/v1/streams/{live.header('Ferry-Stream-Id')}", source=s)
               for s in SOURCES[:2]]
    t0 = time.monotonic()
    code = ferry.stop(timeout_s=GRACE_S + 30)
    took = time.monotonic() - t0
    for s in [stalled, live, *waiting]:
        s.close()
    assert code == 0, ferry.log()[-4000:]
    assert took < GRACE_S + 20, took

