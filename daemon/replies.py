"""Replies matched to the requests that asked for them, by message id (the supervisor's engine
calls, the dispatcher's engine-level calls), and the one way an ErrorReply becomes the
FerryError its code names, for them and the Python client."""
from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

from daemon import protocol as P
from daemon.errors import FerryError, error_from_wire

__all__ = ["PendingReplies", "error_of"]


def error_of(msg: P.ErrorReply) -> FerryError:
    """The error an ErrorReply carries, with its status, code, param and retry_after."""
    return error_from_wire({"status": msg.status, "code": msg.code, "message": msg.message,
                            "param": msg.param, "retry_after": msg.retry_after})


class PendingReplies:
    """One future per request id that waits for a single reply."""

    def __init__(self) -> None:
        self._futures: dict[str, asyncio.Future[Any]] = {}

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in self._futures

    def __len__(self) -> int:
        return len(self._futures)

    def expect(self, msg_id: str) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._futures[msg_id] = fut
        return fut

    def settle(self, msg: P.Message, value: Any = None) -> bool:
        """Complete the future waiting for `msg`'s id: an ErrorReply raises its error there,
        anything else is its result (`value`, or the message itself). False when nothing waits
        for it (answered already, timed out, or someone else's)."""
        fut = self._futures.pop(getattr(msg, "id", ""), None)
        if fut is None:
            return False
        if not fut.done():
            if isinstance(msg, P.ErrorReply):
                fut.set_exception(error_of(msg))
            else:
                fut.set_result(msg if value is None else value)
        return True

    def forget(self, msg_id: str) -> None:
        self._futures.pop(msg_id, None)

    def prune(self) -> None:
        """Drop the entries of calls that ended without a reply (cancelled, timed out)."""
        for msg_id in [k for k, f in self._futures.items() if f.done()]:
            del self._futures[msg_id]

    async def call(self, msg_id: str, send: Callable[[], object], timeout_s: float) -> Any:
        """Expect a reply to `msg_id`, `send` the request (awaited when it is a coroutine), and
        wait at most `timeout_s` for the reply."""
        fut = self.expect(msg_id)
        try:
            sent = send()
            if inspect.isawaitable(sent):
                await sent
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self.forget(msg_id)
