"""Replies matched to requests by id (daemon/replies.py), as the supervisor and the dispatcher
use them: one reply completes its call once, errors keep their class, param and retry_after,
late and unknown replies are dropped, nothing waits on after a timeout."""
from __future__ import annotations

import asyncio

import pytest

from daemon import protocol as P
from daemon.errors import DeadlineExceeded, FerryError, RateLimited
from daemon.replies import PendingReplies, error_of


def test_error_replies_keep_class_param_and_retry_after():
    err = error_of(P.ErrorReply("r", 429, "rate_limited", "slow down", "model", 2.5))
    assert isinstance(err, RateLimited)
    assert (err.status, err.code, err.param, err.retry_after) == (429, "rate_limited", "model",
                                                                   2.5)


def test_a_reply_completes_its_call_once_and_late_or_unknown_ones_are_dropped():
    async def run():
        pending = PendingReplies()
        fut = pending.expect("a")
        assert "a" in pending and len(pending) == 1
        assert pending.settle(P.StatsReply("a", {"x": 1}))
        assert (await fut).stats == {"x": 1}
        assert not pending.settle(P.StatsReply("a", {}))           # a second reply
        assert not pending.settle(P.ErrorReply("a", 500, "internal_error", "late"))
        assert not pending.settle(P.StatsReply("zz", {}))          # nobody asked
        fut = pending.expect("b")
        assert pending.settle(P.ErrorReply("b", 404, "model_not_found", "no such model"))
        with pytest.raises(FerryError) as e:
            await fut
        assert (e.value.status, e.value.code) == (404, "model_not_found")
        assert len(pending) == 0
    asyncio.run(run())


def test_a_call_that_times_out_or_fails_to_send_leaves_nothing_waiting():
    async def run():
        pending = PendingReplies()
        sent = []
        with pytest.raises(asyncio.TimeoutError):
            await pending.call("t", lambda: sent.append(1), timeout_s=0.01)
        assert sent == [1] and len(pending) == 0

        def broken() -> None:
            raise DeadlineExceeded("socket gone")
        with pytest.raises(DeadlineExceeded):
            await pending.call("u", broken, timeout_s=1)
        assert len(pending) == 0

        async def send_then_reply() -> None:
            asyncio.get_running_loop().call_soon(pending.settle, P.StatsReply("v", {"ok": 1}))
        assert (await pending.call("v", send_then_reply, timeout_s=1)).stats == {"ok": 1}
        cancelled = pending.expect("w")
        cancelled.cancel()
        pending.expect("x")
        pending.prune()
        assert "w" not in pending and "x" in pending
    asyncio.run(run())
