"""Slow and surplus HTTP clients against a real daemon: slowloris sockets that trickle a request
head or a body are closed at `server.header_timeout_s` / `server.body_timeout_s`, and a worker
past `server.max_connections` answers new connections 503 and closes them, then serves again
once the slow ones are gone."""
from __future__ import annotations

import json
import socket
import time

import pytest

from tests.integration.conftest import tensor_repo
from tests.integration.daemon_proc import Daemon, http_get, orphan_segments, wait_until

pytestmark = pytest.mark.timeout(120)

HEADER_S, BODY_S, CAP = 1.5, 1.5, 12


@pytest.fixture(scope="module")
def ferry(demo_models, tmp_path_factory):
    d = Daemon(tensor_repo(demo_models, tmp_path_factory, ("digits",)), workers=1,
               server_extra=f"header_timeout_s = {HEADER_S}\nbody_timeout_s = {BODY_S}\n"
                            f"max_connections = {CAP}").start()
    yield d
    assert d.stop() == 0, d.log()[-4000:]
    assert not orphan_segments(), "shared-memory segments leaked"


def _connect(ferry) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", ferry.port), timeout=10)
    sock.settimeout(10)
    return sock


def _closed_after(sock: socket.socket, trickle: bytes, limit_s: float) -> tuple[float, bytes]:
    """Send `trickle` a byte every 0.2 s until the server closes; (seconds taken, reply)."""
    started, reply = time.monotonic(), b""
    sock.setblocking(False)
    try:
        for i in range(int(limit_s / 0.2)):
            try:
                chunk = sock.recv(65536)
                if not chunk:
                    return time.monotonic() - started, reply
                reply += chunk
            except BlockingIOError:
                pass
            except ConnectionResetError:
                return time.monotonic() - started, reply
            try:
                sock.send(trickle[i % len(trickle):i % len(trickle) + 1])
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - started, reply
            time.sleep(0.2)
        return time.monotonic() - started, reply
    finally:
        sock.close()


def test_a_trickled_request_head_is_closed_at_the_header_timeout(ferry):
    sock = _connect(ferry)
    sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n")
    took, reply = _closed_after(sock, b"X-Slow: aaaaaaaaaaaaaaaaaaaa\r\n", 20)
    assert HEADER_S - 0.3 <= took <= HEADER_S + 3, took
    assert reply == b"", reply                   # no request was ever complete


def test_an_idle_keep_alive_connection_is_closed_at_the_header_timeout(ferry):
    sock = _connect(ferry)
    sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200"), first
    started = time.monotonic()
    assert sock.recv(65536) == b""               # the server closes the idle connection
    assert time.monotonic() - started <= HEADER_S + 3


def test_a_trickled_body_is_answered_408_and_closed_at_the_body_timeout(ferry):
    sock = _connect(ferry)
    sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
    took, reply = _closed_after(sock, b"        ", 20)
    assert BODY_S - 0.3 <= took <= BODY_S + 3, took
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply
    assert json.loads(body)["code"] == "body_timeout", body


def test_connections_past_the_cap_are_refused_and_served_again_later(ferry):
    slow = [_connect(ferry) for _ in range(CAP)]
    for s in slow:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\n")    # heads never finished
    time.sleep(0.3)
    extra = _connect(ferry)
    extra.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = b""
    try:
        while chunk := extra.recv(65536):
            reply += chunk
    except ConnectionResetError:
        pass                                    # closed with our request unread: may reset
    extra.close()
    if reply:
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), reply
        assert b"Retry-After: 1" in head
        assert json.loads(body)["error"]["code"] == "too_many_connections"
    # The slow ones are closed at the header timeout; the worker serves again.
    for s in slow:
        assert s.recv(65536) == b""
        s.close()
    wait_until(lambda: http_get(ferry.url + "/v2/health/live", timeout=5)[0] == 200, 10,
               "the worker to serve again")
    assert f"refused 1 connection(s)" in ferry.log()
