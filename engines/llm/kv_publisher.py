"""The ZeroMQ PUB socket an LLM engine publishes its KV-cache events on (engines.llm.kv_events).

The engine loop only puts `(ts, events)` on a bounded queue (`publish`, never blocking: a full
queue drops the batch). A thread of its own owns the socket: it binds, encodes each batch and
sends it with NOBLOCK; a PUB socket drops at its high-water mark rather than block. Sequence
numbers are taken at `publish`, so a batch dropped anywhere leaves a gap a subscriber can see.

Binding is retried every second while it fails: a new version of a model is loaded while the old
one still serves on the same endpoint, and takes the endpoint over once the old one unloads. An
ipc:// path counts as busy while something accepts connections on it (ZeroMQ would silently
replace the file, and the old socket's close would then unlink the new one's); a stale file left by
a dead process is replaced.
"""
from __future__ import annotations

import errno
import logging
import queue
import socket
import threading
from collections.abc import Sequence

import zmq

from engines.llm.kv_events import KVEvent, encode_batch

__all__ = ["KVEventPublisher"]

log = logging.getLogger(__name__)

_QUEUE = 10_000          # batches waiting for the thread
_HWM = 100_000           # messages waiting per subscriber (vLLM's default)
_STOP = None


class KVEventPublisher:
    def __init__(self, endpoint: str, topic: str) -> None:
        self.endpoint = endpoint
        self.topic = topic.encode()
        self.dropped = 0
        self._seq = 0
        self._queue: queue.Queue[tuple[int, float, list[KVEvent]] | None] = \
            queue.Queue(maxsize=_QUEUE)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ferry-kv-events", daemon=True)
        self._thread.start()

    def publish(self, ts: float, events: Sequence[KVEvent]) -> None:
        """Hand one step's events to the sender thread; drops them if it is behind."""
        seq, self._seq = self._seq, self._seq + 1
        try:
            self._queue.put_nowait((seq, ts, list(events)))
        except queue.Full:
            self.dropped += 1

    def close(self, timeout_s: float = 1.0) -> None:
        """Send what is queued (within `timeout_s`), then close the socket."""
        self._stop.set()
        try:
            self._queue.put(_STOP, timeout=timeout_s)
        except queue.Full:
            pass
        self._thread.join(timeout_s)

    def _run(self) -> None:
        sock: zmq.Socket = zmq.Context.instance().socket(zmq.PUB)
        sock.setsockopt(zmq.SNDHWM, _HWM)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            if self._bind(sock):
                self._send_loop(sock)
        finally:
            sock.close(0)

    def _bind(self, sock: zmq.Socket) -> bool:
        warned = False
        while not self._stop.is_set():
            try:
                if _ipc_in_use(self.endpoint):
                    raise zmq.ZMQError(errno.EADDRINUSE)
                sock.bind(self.endpoint)
                log.info("publishing KV-cache events on %s", self.endpoint)
                return True
            except zmq.ZMQError as exc:
                if not warned:
                    log.warning("cannot bind KV-event endpoint %s (%s); retrying",
                                self.endpoint, exc)
                    warned = True
                self._drop_queued()
                self._stop.wait(1.0)
        return False

    def _drop_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is _STOP:
                self._stop.set()
                return
            self.dropped += 1

    def _send_loop(self, sock: zmq.Socket) -> None:
        while True:
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._stop.is_set():      # close() could not queue _STOP: end all the same
                    return
                continue
            if item is _STOP:
                return
            seq, ts, events = item
            try:
                sock.send_multipart([self.topic, seq.to_bytes(8, "big"),
                                     encode_batch(ts, events)], flags=zmq.NOBLOCK)
            except zmq.Again:
                self.dropped += 1


def _ipc_in_use(endpoint: str) -> bool:
    """Whether a live process listens on this ipc:// path."""
    if not endpoint.startswith("ipc://"):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(endpoint[len("ipc://"):])
        return True
    except OSError:
        return False
    finally:
        probe.close()
