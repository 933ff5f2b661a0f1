"""API keys: creation, listing, revocation, rotation and lookup by presented key.

A key reads `fy_<id>_<secret>`: `id` is 12 hex characters, public (it names the key in lists
and logs); `secret` is `secrets.token_urlsafe(32)`, 256 random bits, shown once at creation.

Only SHA-256 of the whole key string is stored. A slow password hash (scrypt, as for admin
passwords) protects low-entropy secrets from offline guessing; a 256-bit random secret cannot be
guessed however fast the hash, so scrypt would only add ~50 ms of CPU to every lookup. A keyed
HMAC with a pepper kept beside the database in the same state directory would add nothing
either: whoever reads the database can read the pepper. Lookups compare digests with
`hmac.compare_digest`.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiosqlite

from daemon.errors import FerryError, InvalidInput
from daemon.state.changes import ChangeCounter
from daemon.state.db import Database
from daemon.state.ratelimit import RateLimits

__all__ = ["SCOPES", "ApiKey", "CreatedKey", "KeyStore", "parse_key", "hash_key"]

log = logging.getLogger(__name__)

SCOPES = frozenset({"infer", "admin"})
_ID_RE = re.compile(r"[0-9a-f]{12}")
_SECRET_RE = re.compile(r"[A-Za-z0-9_-]{43}")
_NAME_MAX = 128
_MODELS_MAX = 256


@dataclass(slots=True, frozen=True)
class ApiKey:
    """A stored key's public record (never the secret nor its hash)."""

    id: str
    name: str
    prefix: str                       # `fy_<id>_` plus 4 secret characters, for recognition
    scopes: frozenset[str]
    models: tuple[str, ...] | None    # fnmatch patterns; None: every model
    limits: RateLimits
    expires_at: float | None          # Unix seconds
    allow_ips: tuple[str, ...]        # normalised CIDRs; empty: any address
    created_at: float
    rotated_at: float | None = None
    revoked_at: float | None = None

    def to_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "prefix": self.prefix,
                "scopes": sorted(self.scopes), "models": list(self.models or []) or None,
                "rpm": self.limits.rpm, "tpm": self.limits.tpm,
                "max_concurrent": self.limits.max_concurrent, "expires_at": self.expires_at,
                "allow_ips": list(self.allow_ips), "created_at": self.created_at,
                "rotated_at": self.rotated_at, "revoked_at": self.revoked_at}


@dataclass(slots=True, frozen=True)
class CreatedKey:
    """A key just created or rotated: the only time its plaintext exists."""

    key: ApiKey
    plaintext: str = field(repr=False)


def parse_key(presented: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed `fy_<id>_<secret>`, else None."""
    parts = presented.split("_", 2)
    if len(parts) != 3 or parts[0] != "fy":
        return None
    if not _ID_RE.fullmatch(parts[1]) or not _SECRET_RE.fullmatch(parts[2]):
        return None
    return parts[1], parts[2]


def hash_key(presented: str) -> bytes:
    return hashlib.sha256(presented.encode()).digest()


# -- validation -----------------------------------------------------------------------------
def _name(name: object) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > _NAME_MAX:
        raise InvalidInput(f"name must be 1-{_NAME_MAX} characters", param="name")
    if any(ord(c) < 32 for c in name):
        raise InvalidInput("name must not contain control characters", param="name")
    return name.strip()


def _scopes(scopes: Iterable[str] | str) -> frozenset[str]:
    items = [scopes] if isinstance(scopes, str) else list(scopes)
    unknown = [s for s in items if s not in SCOPES]
    if unknown or not items:
        raise InvalidInput(f"scopes must be a non-empty subset of {sorted(SCOPES)}; "
                           f"unknown: {unknown}", param="scopes")
    return frozenset(items)


def _models(models: Iterable[str] | None) -> tuple[str, ...] | None:
    if models is None:
        return None
    items = [models] if isinstance(models, str) else list(models)
    if not items or len(items) > _MODELS_MAX or not all(
            isinstance(m, str) and m.strip() for m in items):
        raise InvalidInput(f"models must be omitted (every model) or a list of 1-{_MODELS_MAX} "
                           f"non-empty names or patterns", param="models")
    return tuple(items)


def _limit(value: object, param: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**63:
        # the upper bound is SQLite's INTEGER
        raise InvalidInput(f"{param} must be a positive integer (below 2**63), or omitted for "
                           "no limit", param=param)
    return value


def _cidrs(allow_ips: Iterable[str] | None) -> tuple[str, ...]:
    out = []
    for cidr in [allow_ips] if isinstance(allow_ips, str) else list(allow_ips or ()):
        try:
            out.append(str(ipaddress.ip_network(str(cidr).strip(), strict=False)))
        except ValueError as exc:
            raise InvalidInput(f"allow_ips: {cidr!r} is not an IP address or CIDR network",
                               param="allow_ips") from exc
    return tuple(out)


def _expiry(expires_at: float | None, now: float) -> float | None:
    if expires_at is None:
        return None
    if isinstance(expires_at, bool) or not isinstance(expires_at, (int, float)):
        raise InvalidInput("expires_at must be Unix seconds", param="expires_at")
    if expires_at <= now:
        raise InvalidInput("expires_at is in the past", param="expires_at")
    return float(expires_at)


def _row_to_key(row: sqlite3.Row) -> ApiKey:
    models = json.loads(row["models"]) if row["models"] is not None else None
    return ApiKey(
        id=row["id"], name=row["name"], prefix=row["prefix"],
        scopes=frozenset(json.loads(row["scopes"])),
        models=tuple(models) if models is not None else None,
        limits=RateLimits(row["rpm"], row["tpm"], row["max_concurrent"]),
        expires_at=row["expires_at"], allow_ips=tuple(json.loads(row["allow_ips"])),
        created_at=row["created_at"], rotated_at=row["rotated_at"],
        revoked_at=row["revoked_at"])


def _not_found(key_id: str) -> FerryError:
    return FerryError(f"no API key with id {key_id!r}", code="key_not_found", status=404)


def _new_secret(key_id: str) -> tuple[str, str]:
    """(plaintext, listing prefix)."""
    secret = secrets.token_urlsafe(32)
    return f"fy_{key_id}_{secret}", f"fy_{key_id}_{secret[:4]}"


class KeyStore:
    """API keys in the state database. Lookups are uncached; `daemon.auth` caches them."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time,
                 changes: ChangeCounter | None = None) -> None:
        self._db = db
        self._clock = clock
        self.changes = changes

    def _changed(self) -> None:
        if self.changes is not None:
            self.changes.bump()

    async def create(self, name: str, *, scopes: Iterable[str] | str = ("infer",),
                     models: Iterable[str] | None = None, rpm: int | None = None,
                     tpm: int | None = None, max_concurrent: int | None = None,
                     expires_at: float | None = None,
                     allow_ips: Iterable[str] | None = None) -> CreatedKey:
        """Validate and store a new key; the returned plaintext is never retrievable again."""
        now = self._clock()
        name, scope_set, model_list = _name(name), _scopes(scopes), _models(models)
        limits = RateLimits(_limit(rpm, "rpm"), _limit(tpm, "tpm"),
                            _limit(max_concurrent, "max_concurrent"))
        expiry, cidrs = _expiry(expires_at, now), _cidrs(allow_ips)
        key_id = secrets.token_hex(6)
        plaintext, prefix = _new_secret(key_id)
        async with self._db.transaction() as conn:
            await conn.execute(
                "INSERT INTO api_keys (id, name, prefix, hash, scopes, models, rpm, tpm, "
                "max_concurrent, expires_at, allow_ips, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key_id, name, prefix, hash_key(plaintext), json.dumps(sorted(scope_set)),
                 json.dumps(list(model_list)) if model_list is not None else None,
                 limits.rpm, limits.tpm, limits.max_concurrent, expiry, json.dumps(cidrs), now))
        self._changed()             # another process may have cached "no such key"
        log.info("api key %s created (name=%r, scopes=%s)", key_id, name, sorted(scope_set))
        key = ApiKey(key_id, name, prefix, scope_set, model_list, limits, expiry, cidrs, now)
        return CreatedKey(key, plaintext)

    async def get(self, key_id: str) -> ApiKey:
        found = await self.get_with_hash(key_id)
        if found is None:
            raise _not_found(key_id)
        return found[0]

    async def get_with_hash(self, key_id: str) -> tuple[ApiKey, bytes] | None:
        """The record and stored hash, for callers that compare a presented key themselves."""
        row = await self._db.fetchone("SELECT * FROM api_keys WHERE id = ?", (key_id,))
        return None if row is None else (_row_to_key(row), bytes(row["hash"]))

    async def list(self, *, include_revoked: bool = False) -> list[ApiKey]:
        sql = "SELECT * FROM api_keys"
        if not include_revoked:
            sql += " WHERE revoked_at IS NULL"
        return [_row_to_key(r) for r in await self._db.fetchall(sql + " ORDER BY created_at")]

    async def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key (idempotent). Every process sees it on its next request (ChangeCounter)."""
        async with self._db.transaction() as conn:
            cur = await conn.execute(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
                (self._clock(), key_id))
            if cur.rowcount == 0:
                raise _not_found(key_id)
        self._changed()
        log.info("api key %s revoked", key_id)
        return await self.get(key_id)

    async def rotate(self, key_id: str) -> CreatedKey:
        """Give the key a new secret (same id and settings); the old secret stops working."""
        plaintext, prefix = _new_secret(key_id)
        async with self._db.transaction() as conn:
            cur = await conn.execute(
                "UPDATE api_keys SET hash = ?, prefix = ?, rotated_at = ? "
                "WHERE id = ? AND revoked_at IS NULL",
                (hash_key(plaintext), prefix, self._clock(), key_id))
            if cur.rowcount == 0:
                raise (await self._why_not_rotatable(conn, key_id))
        self._changed()
        log.info("api key %s rotated", key_id)
        return CreatedKey(await self.get(key_id), plaintext)

    async def _why_not_rotatable(self, conn: aiosqlite.Connection, key_id: str) -> FerryError:
        rows = list(await conn.execute_fetchall("SELECT 1 FROM api_keys WHERE id = ?", (key_id,)))
        if not rows:
            return _not_found(key_id)
        return FerryError(f"API key {key_id} is revoked and cannot be rotated",
                          code="key_revoked", status=409)

    async def lookup(self, presented: str) -> ApiKey | None:
        """The key whose secret was presented (revoked or expired included), else None."""
        parsed = parse_key(presented)
        if parsed is None:
            return None
        found = await self.get_with_hash(parsed[0])
        if found is None or not hmac.compare_digest(found[1], hash_key(presented)):
            return None
        return found[0]
