"""Admin users: scrypt password hashes and timing-safe verification.

The stored hash carries its own parameters (`scrypt$n$r$p$salt$hash`), so raising the cost
later leaves old hashes verifiable. `token_version` is bumped on every password change and
copied into session JWTs, so changing a password ends the user's existing sessions.
"""
from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from daemon.errors import FerryError, InvalidInput
from daemon.state.changes import ChangeCounter
from daemon.state.db import Database

__all__ = ["User", "UserStore", "hash_password", "verify_password", "SCRYPT_N", "SCRYPT_R",
           "SCRYPT_P"]

log = logging.getLogger(__name__)

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1      # 16 MiB of memory, ~40 ms per hash
_SALT_BYTES, _DKLEN = 16, 32
# Bounds on parameters read back from the database, so a tampered row cannot make a login
# allocate gigabytes.
_MAX_N, _MAX_R, _MAX_P = 2**20, 32, 16
_USERNAME_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_PASSWORD_MIN, _PASSWORD_MAX = 8, 1024


@dataclass(slots=True, frozen=True)
class User:
    username: str
    token_version: int
    created_at: float
    updated_at: float


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=_DKLEN,
                          maxmem=128 * r * n + 1024 * 1024 * 8)


def hash_password(password: str) -> str:
    """`scrypt$n$r$p$salt$hash` with a fresh random salt."""
    salt = os.urandom(_SALT_BYTES)
    dk = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(dk)}"


def verify_password(password: str, encoded: str) -> bool:
    """Timing-safe check of password against a `hash_password` string; False if malformed."""
    try:
        kind, n_s, r_s, p_s, salt_s, dk_s = encoded.split("$")
        n, r, p = int(n_s), int(r_s), int(p_s)
        salt, expected = base64.b64decode(salt_s), base64.b64decode(dk_s)
    except ValueError:
        return False
    if kind != "scrypt" or not (1 < n <= _MAX_N and 0 < r <= _MAX_R and 0 < p <= _MAX_P):
        return False
    return hmac.compare_digest(_scrypt(password, salt, n, r, p), expected)


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the user does not exist, so a miss costs as long as a wrong
    password and response time does not reveal which usernames exist."""
    return hash_password(os.urandom(16).hex())


def _username(username: object) -> str:
    if not isinstance(username, str) or not _USERNAME_RE.fullmatch(username):
        raise InvalidInput("username must be 1-64 characters of letters, digits and _.@-",
                           param="username")
    return username


def _password(password: object) -> str:
    if not isinstance(password, str) or not _PASSWORD_MIN <= len(password) <= _PASSWORD_MAX:
        raise InvalidInput(f"password must be {_PASSWORD_MIN}-{_PASSWORD_MAX} characters",
                           param="password")
    return password


def _row_to_user(row: sqlite3.Row) -> User:
    return User(row["username"], row["token_version"], row["created_at"], row["updated_at"])


class UserStore:
    """Admin users in the state database. Hashing runs in a worker thread, off the loop."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time,
                 changes: ChangeCounter | None = None) -> None:
        self._db = db
        self._clock = clock
        self.changes = changes

    def _changed(self) -> None:
        if self.changes is not None:
            self.changes.bump()

    async def create(self, username: str, password: str) -> User:
        username, password = _username(username), _password(password)
        encoded = await asyncio.to_thread(hash_password, password)
        now = self._clock()
        try:
            async with self._db.transaction() as conn:
                await conn.execute(
                    "INSERT INTO users (username, password_hash, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?)", (username, encoded, now, now))
        except sqlite3.IntegrityError as exc:
            raise FerryError(f"user {username!r} already exists", code="user_exists",
                             status=409, param="username") from exc
        self._changed()
        log.info("admin user %r created", username)
        return User(username, 1, now, now)

    async def set_password(self, username: str, password: str) -> User:
        """Change the password and end the user's existing sessions."""
        password = _password(password)
        encoded = await asyncio.to_thread(hash_password, password)
        async with self._db.transaction() as conn:
            cur = await conn.execute(
                "UPDATE users SET password_hash = ?, updated_at = ?, "
                "token_version = token_version + 1 WHERE username = ?",
                (encoded, self._clock(), username))
            if cur.rowcount == 0:
                raise _not_found(username)
        self._changed()
        log.info("admin user %r changed password", username)
        return await self._get_or_raise(username)

    async def verify(self, username: str, password: str) -> User | None:
        """The user if the password matches, else None; same cost whether or not they exist."""
        row = await self._db.fetchone("SELECT * FROM users WHERE username = ?", (username,))
        encoded = row["password_hash"] if row is not None else None
        ok = await asyncio.to_thread(
            lambda: verify_password(str(password), encoded or _dummy_hash()))
        if not ok or row is None:
            log.info("admin login failed for %r", username)
            return None
        return _row_to_user(row)

    async def get(self, username: str) -> User | None:
        row = await self._db.fetchone("SELECT * FROM users WHERE username = ?", (username,))
        return None if row is None else _row_to_user(row)

    async def list(self) -> list[User]:
        rows = await self._db.fetchall("SELECT * FROM users ORDER BY username")
        return [_row_to_user(r) for r in rows]

    async def delete(self, username: str) -> None:
        async with self._db.transaction() as conn:
            cur = await conn.execute("DELETE FROM users WHERE username = ?", (username,))
            if cur.rowcount == 0:
                raise _not_found(username)
        self._changed()
        log.info("admin user %r deleted", username)

    async def _get_or_raise(self, username: str) -> User:
        user = await self.get(username)
        if user is None:
            raise _not_found(username)
        return user


def _not_found(username: str) -> FerryError:
    return FerryError(f"no user {username!r}", code="user_not_found", status=404)
