"""sd_notify, watchdog and socket-activation parsing against real AF_UNIX sockets."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.notify import Notifier, listen_fds, watchdog_interval

pytestmark = pytest.mark.timeout(30)

RECV_TIMEOUT_S = 5.0


@pytest.fixture
def path_listener() -> Iterator[tuple[str, socket.socket]]:
    # mkdtemp under /tmp keeps the path far below the 108-byte sun_path limit.
    folder = tempfile.mkdtemp(prefix="ferry-notify-", dir="/tmp")
    address = os.path.join(folder, "notify.sock")
    sock = _listener(address)
    yield address, sock
    sock.close()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def abstract_listener() -> Iterator[tuple[str, socket.socket]]:
    name = f"ferry-test-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    sock = _listener("\0" + name)
    yield "@" + name, sock
    sock.close()


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest) -> tuple[str, socket.socket]:
    return request.getfixturevalue(f"{request.param}_listener")


def _listener(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(RECV_TIMEOUT_S)
    return sock


def _fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


def test_ready_status_watchdog_stopping_exact_datagrams(listener) -> None:
    address, sock = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    assert notifier.ready() is True
    assert sock.recv(4096) == b"READY=1"
    notifier.ready(status="serving 2 models")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving 2 models"
    notifier.status("loading smollm2 v1")
    assert sock.recv(4096) == b"STATUS=loading smollm2 v1"
    notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    notifier.extend_timeout(30_000_000)
    assert sock.recv(4096) == b"EXTEND_TIMEOUT_USEC=30000000"
    notifier.close()


def test_reloading_carries_monotonic_usec(listener) -> None:
    address, sock = listener
    notifier = Notifier(address)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading(status="reloading config")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = _fields(sock.recv(4096))
    assert fields["RELOADING"] == "1"
    assert fields["STATUS"] == "reloading config"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after
    assert list(fields)[:2] == ["RELOADING", "MONOTONIC_USEC"]


def test_send_folds_newlines_so_status_cannot_inject_fields(path_listener) -> None:
    address, sock = path_listener
    notifier = Notifier(address)
    notifier.status("engine died\nREADY=1\r\nagain")
    assert sock.recv(4096) == b"STATUS=engine died READY=1  again"
    notifier.send(errno=5, ready=True, stopping=False)
    assert sock.recv(4096) == b"ERRNO=5\nREADY=1\nSTOPPING=0"


@pytest.mark.parametrize("bad", [{"": 1}, {"x-y": 1}, {"1A": 1}, {"É": 1}])
def test_send_rejects_bad_field_names(bad) -> None:
    with pytest.raises(ValueError, match="field name"):
        Notifier(None).send(**bad)


@pytest.mark.parametrize("usec", [0, -1, 1.5, "10", True, None])
def test_extend_timeout_rejects_non_positive_integers(usec) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        Notifier(None).extend_timeout(usec)


def test_send_without_fields_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one field"):
        Notifier("/run/whatever").send()


@pytest.mark.parametrize("value", [None, ""])
def test_unset_notify_socket_is_a_silent_noop(value, caplog) -> None:
    env = {} if value is None else {"NOTIFY_SOCKET": value}
    notifier = Notifier.from_env(env)
    assert not notifier.enabled
    with caplog.at_level(logging.DEBUG, logger="daemon.notify"):
        assert notifier.ready() is False
        assert notifier.watchdog() is False
        assert notifier.reloading() is False
    assert caplog.records == []


@pytest.mark.parametrize("value", ["vsock:2:1234", "relative/notify.sock"])
def test_unsupported_address_disables_with_one_warning(value, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="daemon.notify"):
        notifier = Notifier(value)
        assert notifier.ready() is False
    assert not notifier.enabled
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "sd_notify disabled" in caplog.records[0].getMessage()


def test_socket_gone_is_logged_once_and_recovers(path_listener, caplog) -> None:
    address, sock = path_listener
    notifier = Notifier(address)
    assert notifier.watchdog() is True
    sock.recv(4096)
    sock.close()
    os.unlink(address)
    with caplog.at_level(logging.DEBUG, logger="daemon.notify"):
        results = [notifier.watchdog() for _ in range(5)]
    assert results == [False] * 5
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and address in warnings[0].getMessage()
    # The service manager comes back (daemon-reexec recreates the socket): sending resumes.
    again = _listener(address)
    try:
        assert notifier.watchdog() is True
        assert again.recv(4096) == b"WATCHDOG=1"
    finally:
        again.close()


def test_socket_is_close_on_exec(path_listener) -> None:
    address, sock = path_listener
    notifier = Notifier(address)
    notifier.watchdog()
    sock.recv(4096)
    fd = notifier._sock.fileno()
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert notifier._sock.type == socket.SOCK_DGRAM


def test_concurrent_senders_deliver_every_datagram_intact(path_listener) -> None:
    address, sock = path_listener
    notifier = Notifier(address)
    threads, per_thread = 8, 50
    expected = {f"READY=1\nSTATUS=t{t}-m{m}".encode()
                for t in range(threads) for m in range(per_thread)}
    failures: list[int] = []

    def sender(t: int) -> None:
        for m in range(per_thread):
            if not notifier.ready(status=f"t{t}-m{m}"):
                failures.append(t)

    workers = [threading.Thread(target=sender, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    received = {sock.recv(4096) for _ in range(threads * per_thread)}
    for w in workers:
        w.join(timeout=RECV_TIMEOUT_S)
    assert failures == []
    assert received == expected


def test_from_env_unset_removes_variables_but_keeps_settings(path_listener) -> None:
    address, sock = path_listener
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "30000000",
           "WATCHDOG_PID": str(os.getpid()), "PATH": "/usr/bin"}
    notifier = Notifier.from_env(env, unset=True)
    assert env == {"PATH": "/usr/bin"}
    assert notifier.watchdog_interval() == 15.0
    notifier.ready()
    assert sock.recv(4096) == b"READY=1"


@pytest.mark.parametrize("env, expected", [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "1"}, 0.0000005),
    ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "{pid}"}, 10.0),
    ({}, None),
    ({"WATCHDOG_USEC": ""}, None),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{pid}0"}, None),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "abc"}, None),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": ""}, None),
])
def test_watchdog_interval(env, expected) -> None:
    env = {k: v.format(pid=os.getpid()) for k, v in env.items()}
    assert watchdog_interval(env) == expected
    assert Notifier.from_env(env).watchdog_interval() == expected


@pytest.mark.parametrize("garbage", ["abc", "0", "-5", "+5", " 5", "5 ", "1_000", "5.0", "1e6",
                                     "²", "18446744073709551615", "99999999999999999999999"])
def test_watchdog_interval_garbage_is_none(garbage, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="daemon.notify"):
        assert watchdog_interval({"WATCHDOG_USEC": garbage}) is None
    assert any("WATCHDOG_USEC" in r.getMessage() for r in caplog.records)


def test_watchdog_interval_explicit_pid() -> None:
    env = {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "4242"}
    assert watchdog_interval(env, pid=4242) == 2.0
    assert watchdog_interval(env, pid=4243) is None


@pytest.mark.parametrize("env", [
    {},
    {"LISTEN_PID": "{pid}"},
    {"LISTEN_PID": "1", "LISTEN_FDS": "1"},
    {"LISTEN_PID": "{pid}", "LISTEN_FDS": "x"},
    {"LISTEN_PID": "x", "LISTEN_FDS": "1"},
    {"LISTEN_PID": "{pid}", "LISTEN_FDS": "0"},
])
def test_listen_fds_not_for_us_is_empty(env) -> None:
    env = {k: v.format(pid=os.getpid()) for k, v in env.items()}
    assert listen_fds(env) == {}
    assert not any(k.startswith("LISTEN_") for k in env)


CHILD = """
import json, os, socket, sys
from daemon.notify import listen_fds
env_before = sorted(k for k in os.environ if k.startswith("LISTEN_"))
fds = listen_fds()
sock = socket.socket(fileno=fds["http"][0])
conn, _ = sock.accept()
conn.sendall(json.dumps({"fds": fds, "before": env_before,
                         "after": sorted(k for k in os.environ if k.startswith("LISTEN_")),
                         "inheritable": os.get_inheritable(fds["http"][0])}).encode())
conn.close()
"""


def test_listen_fds_from_real_socket_activation() -> None:
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed")
    folder = tempfile.mkdtemp(prefix="ferry-act-", dir="/tmp")
    address = os.path.join(folder, "http.sock")
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.Popen([activate, "--listen", address, "--fdname=http",
                             "-E", "PYTHONPATH", sys.executable, "-c", CHILD],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # The activator says so once it listens; the child starts on the first connection.
        assert proc.stderr.readline().startswith(b"Listening on " + address.encode())
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(RECV_TIMEOUT_S * 2)
        client.connect(address)
        reply = _recv_all(client)
        assert proc.wait(timeout=RECV_TIMEOUT_S) == 0, proc.stderr.read().decode()
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(folder, ignore_errors=True)
    data = json.loads(reply)
    assert data["fds"] == {"http": [3]}
    assert data["before"] == ["LISTEN_FDNAMES", "LISTEN_FDS", "LISTEN_PID"]
    assert data["after"] == []
    assert data["inheritable"] is False


def _recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    sock.close()
    return b"".join(chunks)
