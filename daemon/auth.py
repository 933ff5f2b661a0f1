"""Who is calling, and may they do this? Framework-independent request authentication.

The HTTP, WebSocket and ZMQ frontends all call `Authenticator.authenticate` with the presented
credential, the client address, the scope the route needs and the model it touches, and get
a `Principal` or an Unauthorized/Forbidden error with a stable code. Order of checks:

1. global IP allow-list (before reading any credential)          -> 403 ip_not_allowed
2. credential present (or anonymous when auth is not required)    -> 401 missing_credentials
3. JWT (three dot-separated parts) or API key `fy_<id>_<secret>`  -> 401 invalid_token,
   token_expired, invalid_api_key, key_revoked, key_expired
4. the key's own IP allow-list, scope, model allow-list           -> 403 ip_not_allowed,
   insufficient_scope, model_not_allowed

`revoked`/`expired` are only reported after the secret matched, so they tell nothing to
someone who does not hold the key. Scopes are independent: `admin` does not imply `infer`.

Caching: key and user records are cached per process for `cache_ttl_s` (2 s), so the hot path
costs a dict lookup, a SHA-256 and a compare. The stores bump a host-wide ChangeCounter
(daemon.state.changes) after every change to keys or users, from any process, the CLI
included; each request reads it (~1 µs) and a moved counter empties the caches, so a
revocation, rotation or password change applies to the next request everywhere. The TTL is
the backstop for edits made behind the stores' back. Expiry is checked on every request.
A client address of None means a local transport (Unix socket), which file permissions already
guard; it passes the IP allow-lists.
"""
from __future__ import annotations

import fnmatch
import hmac
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from daemon.errors import Forbidden, Unauthorized
from daemon.state.changes import ChangeCounter
from daemon.state.jwt_tokens import JwtIssuer
from daemon.state.keys import SCOPES, ApiKey, KeyStore, hash_key, parse_key
from daemon.state.ratelimit import RateLimits
from daemon.state.users import User, UserStore

__all__ = ["Principal", "Authenticator", "credential_from_headers", "ANONYMOUS"]

log = logging.getLogger(__name__)

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(slots=True, frozen=True)
class Principal:
    """An authenticated caller. `id` is the key id, the JWT subject, or "anonymous"."""

    kind: str                          # "key" | "token" | "anonymous"
    id: str
    name: str
    scopes: frozenset[str]
    limits: RateLimits
    models: tuple[str, ...] | None = None

    def may_use(self, model: str) -> bool:
        return self.models is None or any(fnmatch.fnmatchcase(model, p) for p in self.models)


ANONYMOUS = Principal("anonymous", "anonymous", "anonymous", SCOPES, RateLimits())


def credential_from_headers(headers: Mapping[str, str]) -> str | None:
    """`Authorization: Bearer X` or `X-API-Key: X` (case-insensitive names), else None.

    Another Authorization scheme (Basic, …) is returned as-is so that it is refused as a bad
    credential rather than silently treated as none.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    auth = lowered.get("authorization")
    if auth is not None:
        scheme, _, value = auth.strip().partition(" ")
        return value.strip() if scheme.lower() == "bearer" else auth.strip()
    key = lowered.get("x-api-key")
    return key.strip() if key is not None else None


def _networks(cidrs: Iterable[str]) -> tuple[IpNetwork, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _ip_allowed(client_ip: str | None, networks: tuple[IpNetwork, ...]) -> bool:
    if not networks or client_ip is None:
        return True
    try:
        addr = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        return False
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)


class _TtlCache:
    """Bounded map whose entries expire after ttl seconds (None results are cached too)."""

    def __init__(self, ttl_s: float, max_entries: int, clock: Callable[[], float]) -> None:
        self._ttl, self._max, self._clock = ttl_s, max_entries, clock
        self._data: OrderedDict[str, tuple[float, object]] = OrderedDict()

    def get(self, key: str) -> tuple[bool, object]:
        hit = self._data.get(key)
        if hit is None or hit[0] <= self._clock():
            return False, None
        return True, hit[1]

    def put(self, key: str, value: object) -> None:
        self._data[key] = (self._clock() + self._ttl, value)
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    def drop(self, key: str | None = None) -> None:
        if key is None:
            self._data.clear()
        else:
            self._data.pop(key, None)


class Authenticator:
    """Authentication and authorisation decisions for every frontend."""

    def __init__(self, keys: KeyStore, *, jwt: JwtIssuer | None = None,
                 users: UserStore | None = None, required: bool = True,
                 allow_ips: Iterable[str] = (), cache_ttl_s: float = 2.0,
                 cache_entries: int = 10_000, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._keys, self._jwt, self._users = keys, jwt, users
        self.required = required
        self._allow = _networks(allow_ips)
        self._clock = clock
        self._key_cache = _TtlCache(cache_ttl_s, cache_entries, monotonic)
        self._user_cache = _TtlCache(cache_ttl_s, cache_entries, monotonic)
        self._changes: ChangeCounter | None = getattr(keys, "changes", None)
        self._seen_change = self._changes.value() if self._changes is not None else 0

    def set_allow_ips(self, cidrs: Iterable[str]) -> None:
        """Replace the global IP allow-list (a reloaded configuration)."""
        self._allow = _networks(cidrs)

    def invalidate(self, key_id: str | None = None) -> None:
        """Forget cached records (one key, or everything) after a change made here."""
        self._key_cache.drop(key_id)
        if key_id is None:
            self._user_cache.drop()

    def _follow_changes(self) -> None:
        if self._changes is None:
            return
        count = self._changes.value()
        if count != self._seen_change or count < 0:
            self._seen_change = count
            self.invalidate()

    async def authenticate(self, credential: str | None, client_ip: str | None, scope: str,
                           model: str | None = None) -> Principal:
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}")
        self._follow_changes()
        if not _ip_allowed(client_ip, self._allow):
            raise Forbidden(f"client address {client_ip} is not allowed", code="ip_not_allowed")
        if not credential:
            if self.required:
                raise Unauthorized("missing credentials: send Authorization: Bearer <key> or "
                                   "X-API-Key", code="missing_credentials")
            return ANONYMOUS
        if credential.count(".") == 2 and not credential.startswith("fy_"):
            principal = await self._from_token(credential)
        else:
            principal = await self._from_key(credential, client_ip)
        if scope not in principal.scopes:
            raise Forbidden(f"credential {principal.id} lacks the {scope!r} scope",
                            code="insufficient_scope")
        if model is not None and not principal.may_use(model):
            raise Forbidden(f"credential {principal.id} may not use model {model!r}",
                            code="model_not_allowed")
        return principal

    async def _from_key(self, presented: str, client_ip: str | None) -> Principal:
        parsed = parse_key(presented)
        if parsed is None:
            raise Unauthorized("invalid API key", code="invalid_api_key")
        found = await self._cached_key(parsed[0])
        if found is None or not hmac.compare_digest(found[1], hash_key(presented)):
            raise Unauthorized("invalid API key", code="invalid_api_key")
        key, _, networks = found
        if key.revoked_at is not None:
            raise Unauthorized(f"API key {key.id} has been revoked", code="key_revoked")
        if key.expires_at is not None and key.expires_at <= self._clock():
            raise Unauthorized(f"API key {key.id} has expired", code="key_expired")
        if not _ip_allowed(client_ip, networks):
            raise Forbidden(f"API key {key.id} may not be used from {client_ip}",
                            code="ip_not_allowed")
        return Principal("key", key.id, key.name, key.scopes, key.limits, key.models)

    async def _cached_key(self, key_id: str
                          ) -> tuple[ApiKey, bytes, tuple[IpNetwork, ...]] | None:
        """(record, stored hash, parsed allow-list), from memory when fresh enough."""
        hit, value = self._key_cache.get(key_id)
        if not hit:
            found = await self._keys.get_with_hash(key_id)
            value = None if found is None else (*found, _networks(found[0].allow_ips))
            self._key_cache.put(key_id, value)
        return value  # type: ignore[return-value]

    async def _from_token(self, token: str) -> Principal:
        if self._jwt is None:
            raise Unauthorized("session tokens are not enabled", code="invalid_token")
        claims = self._jwt.verify(token)
        sub: str = claims["sub"]
        if sub.startswith("user:") and self._users is not None:
            user = await self._cached_user(self._users, sub[5:])
            if user is None:
                raise Unauthorized("token user no longer exists", code="invalid_token")
            if claims.get("ver") != user.token_version:
                raise Unauthorized("session ended by a password change", code="invalid_token")
        return Principal("token", sub, sub, frozenset(claims["scopes"]), RateLimits())

    async def _cached_user(self, users: UserStore, username: str) -> User | None:
        hit, value = self._user_cache.get(username)
        if not hit:
            value = await users.get(username)
            self._user_cache.put(username, value)
        return value  # type: ignore[return-value]
