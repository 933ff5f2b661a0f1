"""A lean bridge from a ZeroMQ socket to the asyncio loop for the request path.

zmq.asyncio wraps every receive in a Future and its callbacks, which costs more than the ipc
round trip itself. Here the socket stays a plain (non-blocking) zmq socket: the loop watches its
file descriptor and a callback drains every message that is ready. ZeroMQ's descriptor is
edge-triggered, so after each send (which may consume the edge) the drain is re-armed.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, cast

import zmq

__all__ = ["LoopSocket"]

log = logging.getLogger(__name__)


class LoopSocket:
    """A plain zmq socket driven by the running loop. `on_message(frames)` runs on the loop."""

    def __init__(self, sock: zmq.Socket, on_message: Callable[[list[Any]], None],
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.sock = sock
        self.on_message = on_message
        self.loop = loop or asyncio.get_running_loop()
        self._fd = sock.fileno()   # the same edge-triggered zmq.FD, typed as int
        self._scheduled = False
        self._closed = False
        self.loop.add_reader(self._fd, self._drain)
        self._arm()

    def _arm(self) -> None:
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self.loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        sock = self.sock
        for _ in range(1024):   # bounded, so one busy socket cannot starve the loop
            # pyzmq types every getsockopt() as int | bytes; EVENTS is always an int bitmask
            if self._closed or not cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                return
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            try:
                self.on_message(frames)
            except Exception:   # a bad message must not stop the socket
                log.exception("message handler failed")
        self._arm()

    def send(self, frames: list[Any]) -> bool:
        """Queue frames without blocking; False when the socket has no peer to queue for
        (a DEALER whose engine died): the caller keeps the message for replay."""
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        finally:
            self._arm()
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.loop.remove_reader(self._fd)
        except (ValueError, RuntimeError):
            pass
        self.sock.close(0)
