"""Authenticator: every Unauthorized/Forbidden code, JWT sessions, anonymous mode, caching."""
from __future__ import annotations

import asyncio
import functools
import logging
import time

import pytest

from daemon.auth import ANONYMOUS, Authenticator, credential_from_headers
from daemon.errors import Forbidden, Unauthorized
from daemon.state import open_state
from daemon.state.jwt_tokens import JwtIssuer, load_secret
from daemon.state.keys import parse_key

pytestmark = pytest.mark.timeout(30)


def async_test(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))
    return wrapper


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def refused(auth, cred, ip="127.0.0.1", scope="infer", model=None, *, exc=Unauthorized):
    with pytest.raises(exc) as err:
        await auth.authenticate(cred, ip, scope, model)
    return err.value.code


@async_test
async def test_missing_and_invalid_credentials(tmp_path):
    state = await open_state(tmp_path)
    try:
        auth = Authenticator(state.keys)
        created = await state.keys.create("k")
        key_id, _ = parse_key(created.plaintext)
        assert await refused(auth, None) == "missing_credentials"
        assert await refused(auth, "") == "missing_credentials"
        for bad in ("garbage", "Basic dXNlcjpwYXNz", f"fy_{key_id}_{'A' * 43}",
                    f"fy_ffffffffffff_{'A' * 43}", created.plaintext + "x"):
            assert await refused(auth, bad) == "invalid_api_key", bad
        principal = await auth.authenticate(created.plaintext, "127.0.0.1", "infer")
        assert (principal.kind, principal.id, principal.name) == ("key", key_id, "k")
    finally:
        await state.close()


@async_test
async def test_changes_made_by_another_process_apply_to_the_next_request(tmp_path):
    """`worker` caches for an hour; `other` (another worker, or the CLI) changes the records.
    The shared change counter, not the TTL, makes each change apply at once."""
    worker, other = await open_state(tmp_path), await open_state(tmp_path)
    try:
        secret = load_secret(tmp_path)
        issuer = JwtIssuer(secret)
        auth = Authenticator(worker.keys, jwt=issuer, users=worker.users, cache_ttl_s=3600)
        revoked, rotated = await other.keys.create("r"), await other.keys.create("o")
        for key in (revoked, rotated):
            await auth.authenticate(key.plaintext, None, "infer")           # now cached
        await other.keys.revoke(revoked.key.id)
        assert await refused(auth, revoked.plaintext) == "key_revoked"
        new = await other.keys.rotate(rotated.key.id)
        assert await refused(auth, rotated.plaintext) == "invalid_api_key"
        assert (await auth.authenticate(new.plaintext, None, "infer")).id == rotated.key.id

        user = await other.users.create("bob", "first-password")
        token = issuer.issue("user:bob", ["admin"], token_version=user.token_version)
        await auth.authenticate(token, None, "admin")
        await other.users.set_password("bob", "second-password")
        assert await refused(auth, token, scope="admin") == "invalid_token"
    finally:
        await worker.close()
        await other.close()


@async_test
async def test_edits_behind_the_stores_back_apply_within_the_cache_ttl(tmp_path):
    state = await open_state(tmp_path)
    try:
        mono = Clock(1000.0)
        auth = Authenticator(state.keys, monotonic=mono, cache_ttl_s=2.0)
        created = await state.keys.create("k")
        await auth.authenticate(created.plaintext, None, "infer")
        async with state.db.transaction() as conn:        # not through KeyStore: no signal
            await conn.execute("UPDATE api_keys SET revoked_at = 1 WHERE id = ?",
                               (created.key.id,))
        await auth.authenticate(created.plaintext, None, "infer")  # cached: still accepted
        mono.t += 2.01
        assert await refused(auth, created.plaintext) == "key_revoked"
    finally:
        await state.close()


@async_test
async def test_rotation_refuses_old_secret(tmp_path):
    state = await open_state(tmp_path)
    try:
        auth = Authenticator(state.keys)
        created = await state.keys.create("k")
        rotated = await state.keys.rotate(created.key.id)
        assert await refused(auth, created.plaintext) == "invalid_api_key"
        assert (await auth.authenticate(rotated.plaintext, None, "infer")).id == created.key.id
    finally:
        await state.close()


@async_test
async def test_expired_key(tmp_path):
    state = await open_state(tmp_path)
    try:
        now = time.time()
        clock = Clock(now)
        auth = Authenticator(state.keys, clock=clock)
        created = await state.keys.create("k", expires_at=now + 60)
        await auth.authenticate(created.plaintext, None, "infer")
        clock.t = now + 61
        assert await refused(auth, created.plaintext) == "key_expired"
    finally:
        await state.close()


@async_test
async def test_scopes_are_independent(tmp_path):
    state = await open_state(tmp_path)
    try:
        auth = Authenticator(state.keys)
        infer = await state.keys.create("i", scopes=["infer"])
        admin = await state.keys.create("a", scopes=["admin"])
        both = await state.keys.create("b", scopes=["infer", "admin"])
        assert await refused(auth, infer.plaintext, scope="admin",
                             exc=Forbidden) == "insufficient_scope"
        assert await refused(auth, admin.plaintext, scope="infer",
                             exc=Forbidden) == "insufficient_scope"
        for scope in ("infer", "admin"):
            await auth.authenticate(both.plaintext, None, scope)
        with pytest.raises(ValueError):
            await auth.authenticate(both.plaintext, None, "root")
    finally:
        await state.close()


@async_test
async def test_ip_allow_lists(tmp_path):
    state = await open_state(tmp_path)
    try:
        auth = Authenticator(state.keys, allow_ips=["10.0.0.0/8", "::1"])
        # The global list is checked before credentials are even looked at.
        assert await refused(auth, None, ip="192.168.1.5",
                             exc=Forbidden) == "ip_not_allowed"
        assert await refused(auth, None, ip="10.1.2.3") == "missing_credentials"
        key = await state.keys.create("k", allow_ips=["10.9.0.0/16"])
        await auth.authenticate(key.plaintext, "10.9.8.7", "infer")
        await auth.authenticate(key.plaintext, "::ffff:10.9.8.7", "infer")  # dual-stack form
        await auth.authenticate(key.plaintext, None, "infer")  # Unix socket peer
        assert await refused(auth, key.plaintext, ip="10.1.2.3",
                             exc=Forbidden) == "ip_not_allowed"
        assert await refused(auth, key.plaintext, ip="not-an-ip",
                             exc=Forbidden) == "ip_not_allowed"
        open_auth = Authenticator(state.keys)
        await open_auth.authenticate(key.plaintext, "10.9.0.1", "infer")
        assert await refused(open_auth, key.plaintext, ip="::1",
                             exc=Forbidden) == "ip_not_allowed"
    finally:
        await state.close()


@async_test
async def test_model_allow_list(tmp_path):
    state = await open_state(tmp_path)
    try:
        auth = Authenticator(state.keys)
        key = await state.keys.create("k", models=["mnist-*", "smollm2"])
        await auth.authenticate(key.plaintext, None, "infer", "mnist-v2")
        await auth.authenticate(key.plaintext, None, "infer", "smollm2")
        await auth.authenticate(key.plaintext, None, "infer", None)
        assert await refused(auth, key.plaintext, model="minilm",
                             exc=Forbidden) == "model_not_allowed"
    finally:
        await state.close()


@async_test
async def test_optional_auth_is_anonymous_but_still_refuses_bad_credentials(tmp_path):
    state = await open_state(tmp_path)
    try:
        auth = Authenticator(state.keys, required=False)
        assert await auth.authenticate(None, "127.0.0.1", "admin", "any") is ANONYMOUS
        assert await refused(auth, "fy_nonsense") == "invalid_api_key"
        key = await state.keys.create("k", scopes=["infer"])
        assert (await auth.authenticate(key.plaintext, None, "infer")).kind == "key"
        assert await refused(auth, key.plaintext, scope="admin",
                             exc=Forbidden) == "insufficient_scope"
    finally:
        await state.close()


@async_test
async def test_jwt_sessions(tmp_path):
    state = await open_state(tmp_path)
    try:
        secret = load_secret(tmp_path)
        issuer = JwtIssuer(secret)
        auth = Authenticator(state.keys, jwt=issuer, users=state.users, cache_ttl_s=0)
        user = await state.users.create("alice", "first-password")
        token = issuer.issue("user:alice", ["admin"], token_version=user.token_version)
        principal = await auth.authenticate(token, None, "admin")
        assert (principal.kind, principal.id) == ("token", "user:alice")
        assert await refused(auth, token, scope="infer", exc=Forbidden) == "insufficient_scope"
        assert await refused(auth, token[:-2] + "xx") == "invalid_token"
        expired = JwtIssuer(secret, clock=lambda: time.time() - 5000).issue(
            "user:alice", ["admin"], token_version=1)
        assert await refused(auth, expired, scope="admin") == "token_expired"
        await state.users.set_password("alice", "second-password")
        assert await refused(auth, token, scope="admin") == "invalid_token"
        fresh = issuer.issue("user:alice", ["admin"], token_version=2)
        await auth.authenticate(fresh, None, "admin")
        await state.users.delete("alice")
        assert await refused(auth, fresh, scope="admin") == "invalid_token"
        no_jwt = Authenticator(state.keys)
        assert await refused(no_jwt, issuer.issue("svc", ["infer"])) == "invalid_token"
    finally:
        await state.close()


@async_test
async def test_hot_path_is_served_from_cache(tmp_path):
    state = await open_state(tmp_path)
    try:
        calls = []
        real = state.keys.get_with_hash

        async def counting(key_id):
            calls.append(key_id)
            return await real(key_id)
        state.keys.get_with_hash = counting
        auth = Authenticator(state.keys)
        key = await state.keys.create("k")
        for _ in range(100):
            await auth.authenticate(key.plaintext, "127.0.0.1", "infer")
        for _ in range(10):
            await refused(auth, f"fy_ffffffffffff_{'A' * 43}")
        assert calls == [key.key.id, "ffffffffffff"]
    finally:
        await state.close()


@async_test
async def test_secret_never_in_logs_or_errors(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    state = await open_state(tmp_path)
    try:
        auth = Authenticator(state.keys)
        key = await state.keys.create("k", scopes=["infer"], allow_ips=["10.0.0.0/8"])
        messages = []
        for scope, ip in (("admin", "10.0.0.1"), ("infer", "8.8.8.8")):
            with pytest.raises((Unauthorized, Forbidden)) as err:
                await auth.authenticate(key.plaintext, ip, scope)
            messages.append(err.value.message)
        await state.keys.revoke(key.key.id)
        auth.invalidate()
        with pytest.raises(Unauthorized) as err:
            await auth.authenticate(key.plaintext, "10.0.0.1", "infer")
        messages.append(err.value.message)
    finally:
        await state.close()
    secret = parse_key(key.plaintext)[1]
    assert secret not in caplog.text and all(secret not in m for m in messages)


def test_credential_from_headers():
    assert credential_from_headers({"Authorization": "Bearer abc"}) == "abc"
    assert credential_from_headers({"authorization": "bearer  abc "}) == "abc"
    assert credential_from_headers({"X-API-Key": "k1"}) == "k1"
    assert credential_from_headers({"x-api-key": "k1", "Authorization": "Bearer k2"}) == "k2"
    assert credential_from_headers({"Authorization": "Basic dXNlcg=="}) == "Basic dXNlcg=="
    assert credential_from_headers({"Content-Type": "application/json"}) is None
