"""Errors crossing a process boundary keep what a client needs to act on them."""
from __future__ import annotations

import pytest

import daemon.protocol as P
from daemon.errors import (Busy, Cancelled, ContextLengthExceeded, DeadlineExceeded, EngineDied,
                           FerryError, Forbidden, InternalError, InvalidInput, ModelNotFound,
                           ModelUnavailable, Overloaded, PayloadTooLarge, ProtocolMismatch,
                           RateLimited, Unauthorized, UnsupportedMediaType, error_from_wire)


def test_a_retry_hint_survives_the_wire():
    sent = Overloaded("the queue is full", retry_after=3.0)
    got = error_from_wire(sent.to_wire())
    assert isinstance(got, RateLimited)
    assert (got.status, got.code, got.message, got.retry_after) == \
        (429, "overloaded", "the queue is full", 3.0)


@pytest.mark.parametrize("sent", [
    InvalidInput("bad"), ContextLengthExceeded("long"), ModelNotFound("who", param="model"),
    ModelUnavailable("loading"), Busy("arena full"), DeadlineExceeded("late"),
    PayloadTooLarge("big"), UnsupportedMediaType("xml"), Unauthorized("key?"),
    Forbidden("not yours"), ProtocolMismatch("v2"), EngineDied("gone"), Cancelled("stop"),
    InternalError("oops"), RateLimited("slow", retry_after=2.5), Overloaded("full"),
])
def test_every_error_comes_back_as_its_own_class(sent):
    got = error_from_wire(sent.to_wire())
    assert type(got) is type(sent)
    assert (got.status, got.code, got.message, got.param) == \
        (sent.status, sent.code, sent.message, sent.param)
    assert getattr(got, "retry_after", None) == getattr(sent, "retry_after", None)


def test_a_code_of_its_own_keeps_it_and_a_400_is_invalid_input():
    got = error_from_wire(InvalidInput("bad", code="invalid_shape", param="x").to_wire())
    assert type(got) is InvalidInput and not hasattr(got, "retry_after")
    assert (got.status, got.code, got.param) == (400, "invalid_shape", "x")
    got = error_from_wire(FerryError("odd", code="shm_in_use", status=409).to_wire())
    assert type(got) is FerryError and (got.status, got.code) == (409, "shm_in_use")
    # the status sent wins over the class's default
    got = error_from_wire({"status": 502, "code": "busy", "message": "m"})
    assert type(got) is Busy and got.status == 502


def test_a_retry_hint_on_any_code_keeps_retry_after():
    got = error_from_wire({"status": 503, "code": "arena_full", "message": "m",
                           "retry_after": 4})
    assert isinstance(got, RateLimited) and (got.status, got.code, got.retry_after) == \
        (503, "arena_full", 4.0)


def test_a_non_numeric_retry_hint_is_ignored():
    for bad in ("3", True, None, [1]):
        got = error_from_wire({"status": 503, "code": "busy", "message": "m",
                               "retry_after": bad})
        assert type(got) is Busy and not hasattr(got, "retry_after"), bad
    got = error_from_wire({"status": 500, "code": "something_new", "message": "m"})
    assert type(got) is FerryError


def test_error_reply_carries_retry_after_and_old_replies_still_decode():
    msg, _ = P.decode(P.encode(P.ErrorReply("i", 429, "rate_limited", "slow down",
                                            None, 2.0)))
    assert isinstance(msg, P.ErrorReply) and msg.retry_after == 2.0
    msg, _ = P.decode(P.encode(P.ErrorReply("i", 400, "bad", "m")))
    assert isinstance(msg, P.ErrorReply) and msg.retry_after is None
