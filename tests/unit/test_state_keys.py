"""API keys: lifecycle, validation, hashed storage, timing-safe lookup, no secret in logs."""
from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import sqlite3
import time

import pytest

from daemon.errors import FerryError, InvalidInput
from daemon.state import open_state
from daemon.state.keys import hash_key, parse_key

pytestmark = pytest.mark.timeout(30)


def async_test(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))
    return wrapper


@async_test
async def test_create_returns_plaintext_once_and_stores_only_a_hash(tmp_path):
    state = await open_state(tmp_path)
    try:
        created = await state.keys.create(
            "ci", scopes=["infer", "admin"], models=["smollm2", "mnist-*"], rpm=60, tpm=1000,
            max_concurrent=4, expires_at=time.time() + 3600, allow_ips=["10.0.0.0/8", "::1"])
        key_id, secret = parse_key(created.plaintext)
        assert created.plaintext == f"fy_{key_id}_{secret}" and len(secret) == 43
        assert created.key.id == key_id and created.key.prefix == f"fy_{key_id}_{secret[:4]}"
        assert created.plaintext not in repr(created)
        assert created.key.allow_ips == ("10.0.0.0/8", "::1/128")
        assert created.key.limits.rpm == 60 and created.key.limits.max_concurrent == 4
    finally:
        await state.close()
    with sqlite3.connect(tmp_path / "ferry.db") as conn:
        dump = "\n".join(conn.iterdump())
        stored = conn.execute("SELECT hash FROM api_keys").fetchone()[0]
    assert secret not in dump and created.plaintext not in dump
    assert stored == hash_key(created.plaintext)


@async_test
async def test_list_never_shows_the_secret(tmp_path):
    state = await open_state(tmp_path)
    try:
        created = await state.keys.create("a")
        await state.keys.create("b", scopes="admin")
        listed = await state.keys.list()
        assert [k.name for k in listed] == ["a", "b"]
        text = repr(listed) + repr([k.to_dict() for k in listed])
        assert parse_key(created.plaintext)[1] not in text
        assert "hash" not in listed[0].to_dict()
    finally:
        await state.close()


@async_test
async def test_revoke_and_rotate(tmp_path):
    state = await open_state(tmp_path)
    try:
        first = await state.keys.create("svc", rpm=10)
        rotated = await state.keys.rotate(first.key.id)
        assert rotated.key.id == first.key.id and rotated.plaintext != first.plaintext
        assert rotated.key.limits == first.key.limits and rotated.key.rotated_at is not None
        assert await state.keys.lookup(first.plaintext) is None
        assert (await state.keys.lookup(rotated.plaintext)).id == first.key.id

        revoked = await state.keys.revoke(first.key.id)
        assert revoked.revoked_at is not None
        assert await state.keys.list() == []
        assert [k.id for k in await state.keys.list(include_revoked=True)] == [first.key.id]
        # lookup still finds it (auth reports "revoked" only to the holder of the secret)
        assert (await state.keys.lookup(rotated.plaintext)).revoked_at is not None
        with pytest.raises(FerryError) as err:
            await state.keys.rotate(first.key.id)
        assert err.value.code == "key_revoked" and err.value.status == 409
        with pytest.raises(FerryError) as err:
            await state.keys.revoke("000000000000")
        assert err.value.code == "key_not_found" and err.value.status == 404
    finally:
        await state.close()


@async_test
async def test_lookup_uses_compare_digest(tmp_path, monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)
    monkeypatch.setattr(hmac, "compare_digest", spy)
    state = await open_state(tmp_path)
    try:
        created = await state.keys.create("k")
        key_id, secret = parse_key(created.plaintext)
        wrong = f"fy_{key_id}_{'A' * 43}"
        assert await state.keys.lookup(wrong) is None
        assert await state.keys.lookup(created.plaintext) is not None
        assert len(calls) == 2 and calls[1] == (hash_key(created.plaintext),) * 2
    finally:
        await state.close()


@pytest.mark.parametrize("presented", [
    "", "fy_", "sk-abc", "fy_xyz_" + "A" * 43, "fy_0123456789ab_short",
    "fy_0123456789ab_" + "A" * 42 + "!", "fx_0123456789ab_" + "A" * 43])
def test_malformed_keys_do_not_parse(presented):
    assert parse_key(presented) is None


@pytest.mark.parametrize("kwargs, param", [
    ({"scopes": ["infer", "root"]}, "scopes"),
    ({"scopes": []}, "scopes"),
    ({"allow_ips": ["10.0.0.0/33"]}, "allow_ips"),
    ({"allow_ips": ["not-an-ip"]}, "allow_ips"),
    ({"rpm": -1}, "rpm"),
    ({"tpm": 0}, "tpm"),
    ({"max_concurrent": -5}, "max_concurrent"),
    ({"rpm": 1.5}, "rpm"),
    ({"expires_at": time.time() - 10}, "expires_at"),
    ({"expires_at": "tomorrow"}, "expires_at"),
    ({"models": []}, "models"),
    ({"models": [""]}, "models"),
    ({"name": ""}, "name"),
    ({"name": "a\nb"}, "name"),
])
def test_bad_inputs_are_refused_with_param(tmp_path, kwargs, param):
    async def body():
        state = await open_state(tmp_path)
        try:
            args = {"name": "k", **kwargs}
            with pytest.raises(InvalidInput) as err:
                await state.keys.create(args.pop("name"), **args)
            assert err.value.param == param and err.value.status == 400
            assert await state.keys.list() == []
        finally:
            await state.close()
    asyncio.run(body())


@async_test
async def test_plaintext_key_never_logged(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    state = await open_state(tmp_path)
    try:
        created = await state.keys.create("logged")
        await state.keys.lookup(created.plaintext)
        rotated = await state.keys.rotate(created.key.id)
        await state.keys.revoke(created.key.id)
    finally:
        await state.close()
    assert caplog.records, "expected the key operations to log something"
    for plaintext in (created.plaintext, rotated.plaintext):
        secret = parse_key(plaintext)[1]
        assert secret not in caplog.text
    assert created.key.id in caplog.text
