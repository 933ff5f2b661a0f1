"""Admin users: scrypt hashing with stored parameters, timing-safe verification."""
from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import sqlite3

import pytest

from daemon.errors import FerryError, InvalidInput
from daemon.state import open_state
from daemon.state.users import SCRYPT_N, hash_password, verify_password

pytestmark = pytest.mark.timeout(30)


def async_test(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))
    return wrapper


def test_hash_carries_parameters_and_random_salt():
    a, b = hash_password("correct horse"), hash_password("correct horse")
    kind, n, r, p, salt, dk = a.split("$")
    assert (kind, int(n), int(r), int(p)) == ("scrypt", SCRYPT_N, 8, 1) and SCRYPT_N == 2**14
    assert a != b  # fresh salt each time
    assert verify_password("correct horse", a) and verify_password("correct horse", b)
    assert not verify_password("correct horsf", a)


def test_verify_is_timing_safe(monkeypatch):
    encoded = hash_password("s3cret-pass")
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda x, y: calls.append(1) or real(x, y))
    assert not verify_password("wrong-pass", encoded)
    assert calls == [1]


@pytest.mark.parametrize("encoded", [
    "", "scrypt$1$2", "bcrypt$16384$8$1$AAAA$AAAA", "scrypt$x$8$1$AAAA$AAAA",
    f"scrypt${2**30}$8$1$AAAA$AAAA",  # absurd cost from a tampered row: refused, not run
    "scrypt$16384$8$1$!!!$AAAA"])
def test_malformed_or_abusive_hashes_do_not_verify(encoded):
    assert not verify_password("anything", encoded)


@async_test
async def test_user_lifecycle(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    state = await open_state(tmp_path)
    try:
        user = await state.users.create("alice", "first-password")
        assert user.token_version == 1
        assert (await state.users.verify("alice", "first-password")).username == "alice"
        assert await state.users.verify("alice", "wrong-password") is None
        assert await state.users.verify("mallory", "first-password") is None
        changed = await state.users.set_password("alice", "second-password")
        assert changed.token_version == 2
        assert await state.users.verify("alice", "first-password") is None
        assert await state.users.verify("alice", "second-password") is not None
        with pytest.raises(FerryError) as err:
            await state.users.create("alice", "another-password")
        assert err.value.code == "user_exists" and err.value.status == 409
        assert [u.username for u in await state.users.list()] == ["alice"]
        await state.users.delete("alice")
        assert await state.users.get("alice") is None
        with pytest.raises(FerryError) as err:
            await state.users.set_password("alice", "third-password")
        assert err.value.code == "user_not_found"
    finally:
        await state.close()
    with sqlite3.connect(tmp_path / "ferry.db") as conn:
        assert "second-password" not in "\n".join(conn.iterdump())
    for password in ("first-password", "second-password", "wrong-password"):
        assert password not in caplog.text


@pytest.mark.parametrize("username, password, param", [
    ("", "long-enough", "username"), ("a b", "long-enough", "username"),
    ("x" * 65, "long-enough", "username"), ("bob", "short", "password"),
    ("bob", None, "password")])
def test_bad_user_input(tmp_path, username, password, param):
    async def body():
        state = await open_state(tmp_path)
        try:
            with pytest.raises(InvalidInput) as err:
                await state.users.create(username, password)
            assert err.value.param == param
        finally:
            await state.close()
    asyncio.run(body())
