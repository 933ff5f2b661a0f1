"""Access control for one frontend process: who is calling (daemon.auth), how much they may do
(daemon.state.ratelimit) and the record of what they did (the request log).

The HTTP frontend (frontends/http/security.py) and the ZMQ frontend (frontends/zmq/server.py)
both open one `Access` at start and ask it the same questions, so a key means the same on
every transport:

    principal = await access.authenticate(credential, client_ip, "infer", model)
    admission = access.admit(principal)          # raises RateLimited (429)
    try: ... finally: access.release(admission)

Every unit of work is charged to its key the same way: a direct request, each WebSocket
message, each ZMQ request and each batch item (`batch_item`, which waits for budget instead of
failing). Tokens per minute are reserved before a generation starts (`reserve`: the prompt plus
every token it may generate) and settled to what it really used at the end (`settle`), so a
key never gets more tokens through than its limit allows.

With `auth.required = false` credentials are not examined at all (every caller is anonymous
and unlimited), as vLLM does without `--api-key`; the global IP allow-list still applies. The
admin API is the exception: it always needs an admin credential (`always=True`), so turning
auth off never hands key management to every local user.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.auth import Authenticator, Principal
from daemon.egress import EgressPolicy
from daemon.errors import ConfigError, FerryError, RateLimited
from daemon.state import State, open_state
from daemon.state.jwt_tokens import JwtIssuer, load_secret
from daemon.state.ratelimit import Decision, RateLimiter, RateLimits

__all__ = ["AccessSettings", "Admission", "ItemCharge", "Access", "RATELIMIT_TABLE"]

log = logging.getLogger(__name__)

RATELIMIT_TABLE = "ratelimit.tbl"
# Retention of the request log (rows are ~200 bytes without bodies): a month, a million rows.
_LOG_MAX_AGE_S = 30 * 24 * 3600.0
_LOG_MAX_ROWS = 1_000_000
_LOGIN_LIMITS = RateLimits(rpm=10)     # per client address: scrypt costs ~40 ms a try


@dataclass(slots=True, frozen=True)
class AccessSettings:
    state_dir: Path
    runtime_dir: Path
    required: bool = False
    allow_ips: tuple[str, ...] = ()
    jwt_secret_file: str = ""
    log_bodies: bool = False
    prune_log: bool = False            # one process per daemon applies retention
    webhook_allow_cidrs: tuple[str, ...] = ()

    @classmethod
    def from_args(cls, args: dict[str, Any], *, prune_log: bool = False) -> AccessSettings:
        """From the frontend arguments the supervisor passes (daemon/supervisor.py)."""
        auth = args.get("auth") or {}
        runtime = args.get("runtime_dir")
        if runtime is None:
            # The control socket lives in the runtime directory: ipc://<runtime_dir>/control.sock
            runtime = Path(str(args["control"]).removeprefix("ipc://")).parent
        return cls(Path(args["state_dir"]), Path(runtime), bool(auth.get("required", False)),
                   tuple(auth.get("allow_ips") or ()), str(auth.get("jwt_secret_file") or ""),
                   bool(args.get("log_bodies", False)), prune_log,
                   tuple(auth.get("webhook_allow_cidrs") or ()))


def read_jwt_secret(settings: AccessSettings) -> bytes:
    """`auth.jwt_secret_file` if configured, else `<state_dir>/jwt.secret` (made 0600)."""
    if not settings.jwt_secret_file:
        return load_secret(settings.state_dir)
    try:
        raw = Path(settings.jwt_secret_file).read_bytes().strip()
    except OSError as exc:
        raise ConfigError("auth.jwt_secret_file", f"cannot read {settings.jwt_secret_file}: "
                          f"{exc.strerror}") from None
    return load_secret(settings.state_dir, raw)


@dataclass(slots=True)
class Admission:
    """One admitted request: the caller, and what it holds until `Access.release`."""

    principal: Principal
    decision: Decision | None = None      # the buckets, for the X-RateLimit-* headers
    holds_slot: bool = False
    reserved: int = 0                     # tokens debited ahead by `reserve`; `settle` trues up

    def headers(self) -> dict[str, str]:
        return self.decision.headers() if self.decision is not None else {}


@dataclass(slots=True)
class ItemCharge:
    """What `Access.batch_item` yields: set `used` to the tokens the item really used (None:
    unknown, e.g. it failed; its whole reservation then stays charged)."""

    used: int | None = None
    admission: Admission | None = None


def _refusal(decision: Decision) -> RateLimited:
    """429 with a stable code per exhausted limit; `.headers` holds the response headers."""
    retry = max(1, math.ceil(decision.retry_after_s))
    if decision.reason == "concurrency":
        exc = RateLimited(f"at most {decision.limit} requests may be in flight for this key",
                          code="too_many_concurrent_requests", retry_after=retry)
    elif decision.reason == "tokens":
        exc = RateLimited(f"token rate limit of {decision.tokens_limit} tokens per minute "
                          f"exceeded; retry after {retry} s", code="token_rate_limited",
                          retry_after=retry)
    else:
        exc = RateLimited(f"rate limit of {decision.limit} requests per minute exceeded; "
                          f"retry after {retry} s", retry_after=retry)
    headers = (decision.headers() if decision.reason != "concurrency"
               else {"Retry-After": str(retry)})
    exc.headers = headers  # type: ignore[attr-defined]   # the HTTP layer sends them
    return exc


class Access:
    """One process's authenticator, rate limiter and request log."""

    def __init__(self, settings: AccessSettings, state: State, limiter: RateLimiter,
                 jwt: JwtIssuer) -> None:
        self.settings, self.state, self.limiter, self.jwt = settings, state, limiter, jwt
        self.egress = EgressPolicy(settings.webhook_allow_cidrs)
        self.auth = Authenticator(state.keys, jwt=jwt, users=state.users, required=True,
                                  allow_ips=settings.allow_ips)
        # Without credentials this one only applies the global IP allow-list.
        self._open = Authenticator(state.keys, required=False, allow_ips=settings.allow_ips)

    @classmethod
    async def open(cls, settings: AccessSettings) -> Access:
        prune = settings.prune_log
        state = await open_state(settings.state_dir, store_bodies=settings.log_bodies,
                                 log_max_age_s=_LOG_MAX_AGE_S if prune else None,
                                 log_max_rows=_LOG_MAX_ROWS if prune else None)
        try:
            jwt = JwtIssuer(read_jwt_secret(settings))
            settings.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            limiter = RateLimiter(settings.runtime_dir / RATELIMIT_TABLE)
        except BaseException:
            await state.close()
            raise
        return cls(settings, state, limiter, jwt)

    async def close(self) -> None:
        """Close the state; remove the rate-limit table (frontends close only when the daemon
        stops, and a process still using it keeps its mapping)."""
        try:
            await self.state.close()
        finally:
            self.limiter.close()
            self.limiter.path.unlink(missing_ok=True)

    @property
    def required(self) -> bool:
        return self.settings.required

    def reconfigure(self, auth: dict[str, Any]) -> None:
        """Apply reloaded `[auth]` settings (Placement.config after a SIGHUP): whether keys are
        required, the global IP allow-list and the webhook egress allow-list. Keys, users and
        limits live in the database and need no reload; jwt_secret_file needs a restart."""
        new = dataclasses.replace(
            self.settings, required=bool(auth.get("required", self.settings.required)),
            allow_ips=tuple(auth.get("allow_ips", self.settings.allow_ips)),
            webhook_allow_cidrs=tuple(auth.get("webhook_allow_cidrs",
                                               self.settings.webhook_allow_cidrs)))
        if new == self.settings:
            return
        self.auth.set_allow_ips(new.allow_ips)
        self._open.set_allow_ips(new.allow_ips)
        self.egress.set_allow(new.webhook_allow_cidrs)
        self.settings = new
        log.info("access settings reloaded: auth %s, %d allow-list entries, %d webhook networks",
                 "required" if new.required else "off", len(new.allow_ips),
                 len(new.webhook_allow_cidrs))

    async def authenticate(self, credential: str | None, client_ip: str | None, scope: str,
                           model: str | None = None, *, always: bool = False) -> Principal:
        """The caller, or Unauthorized/Forbidden with a stable code (see daemon.auth)."""
        if not self.settings.required and not always:
            return await self._open.authenticate(None, client_ip, scope)
        return await self.auth.authenticate(credential, client_ip, scope, model)

    async def check_ip(self, client_ip: str | None) -> None:
        """Forbidden `ip_not_allowed` unless the global allow-list admits the address."""
        await self._open.authenticate(None, client_ip, "infer")

    def admit(self, principal: Principal) -> Admission:
        """Take a concurrency slot and a request from the key's buckets, or raise RateLimited.

        The slot is taken first so that a request refused for concurrency costs no request
        token; a request refused by the buckets gives its slot back at once.
        """
        limits = principal.limits
        if limits.unlimited:
            return Admission(principal)
        slot = self.limiter.acquire_concurrency(principal.id, limits.max_concurrent)
        if not slot.allowed:
            raise _refusal(slot)
        holds = bool(limits.max_concurrent)
        decision = self.limiter.check(principal.id, limits)
        if not decision.allowed:
            if holds:
                self.limiter.release(principal.id)
            raise _refusal(decision)
        return Admission(principal, decision if limits.rpm or limits.tpm else None, holds)

    def release(self, admission: Admission) -> None:
        if admission.holds_slot:
            admission.holds_slot = False
            self.limiter.release(admission.principal.id)

    def reserve(self, admission: Admission, tokens: int) -> None:
        """Debit `tokens` (the prompt plus every token the work may generate) from the key's
        tokens per minute before the work starts, or raise RateLimited. A request larger than
        the whole per-minute limit could never fit: it is refused with its own code."""
        limits = admission.principal.limits
        if not limits.tpm or tokens <= 0:
            return
        if tokens > limits.tpm:
            raise RateLimited(f"this request may use {tokens} tokens (prompt plus max_tokens), "
                              f"more than the key's limit of {limits.tpm} tokens per minute; "
                              "lower max_tokens or shorten the prompt",
                              code="request_exceeds_token_limit", retry_after=60.0)
        decision = self.limiter.check(admission.principal.id, limits, cost_requests=0,
                                      cost_tokens=tokens)
        if not decision.allowed:
            raise _refusal(decision)
        admission.reserved += tokens
        admission.decision = decision

    def settle(self, admission: Admission, used: int) -> None:
        """Charge the tokens the work really used, less its reservation (a refund when less)."""
        tokens, admission.reserved = used - admission.reserved, 0
        if admission.principal.limits.tpm and tokens:
            self.limiter.charge_tokens(admission.principal.id, tokens)

    async def admit_waiting(self, principal: Principal) -> Admission:
        """`admit`, waiting out every refusal instead of raising it."""
        while True:
            try:
                return self.admit(principal)
            except RateLimited as exc:
                await asyncio.sleep(min(max(exc.retry_after, 0.05), 60.0))

    async def reserve_waiting(self, admission: Admission, tokens: int) -> None:
        """`reserve`, waiting for the tokens (a request over the whole limit still raises)."""
        while True:
            try:
                return self.reserve(admission, tokens)
            except RateLimited as exc:
                if exc.code == "request_exceeds_token_limit":
                    raise
                await asyncio.sleep(min(max(exc.retry_after, 0.05), 60.0))

    async def owner(self, key_id: str | None) -> Principal | None:
        """The key a batch job was submitted with (None: anonymous, a session token or a key
        that no longer exists; its items are not limited)."""
        if not key_id:
            return None
        try:
            key = await self.state.keys.get(key_id)
        except FerryError:
            return None
        return Principal("key", key.id, key.name, key.scopes, key.limits, key.models)

    @contextlib.asynccontextmanager
    async def batch_item(self, key_id: str | None) -> AsyncIterator[ItemCharge]:
        """Charge one batch item to the key that submitted its job, as a direct request is:
        a concurrency slot and a request (entering waits until the key has them), its tokens
        reserved by the generation (`bill.admission`, waiting too) and settled on leaving."""
        bill = ItemCharge()
        principal = await self.owner(key_id)
        if principal is None or principal.limits.unlimited:
            yield bill
            return
        bill.admission = admission = await self.admit_waiting(principal)
        try:
            yield bill
        finally:
            self.release(admission)
            self.settle(admission, admission.reserved if bill.used is None else bill.used)

    def admit_login(self, client_ip: str | None) -> None:
        """Throttle password guessing per client address (RateLimited when exceeded)."""
        decision = self.limiter.check(f"login:{client_ip or 'local'}", _LOGIN_LIMITS)
        if not decision.allowed:
            raise RateLimited("too many login attempts from this address",
                              code="login_rate_limited", retry_after=decision.retry_after_s)

    def record(self, request_id: str, *, principal: Principal | None, model: str | None,
               route: str, status: int, code: str | None = None,
               total_ms: float | None = None, prompt_tokens: int | None = None,
               completion_tokens: int | None = None, body: bytes | None = None) -> None:
        """Append one request-log row (buffered; never blocks the request)."""
        self.state.requests.append(
            request_id, key_id=principal.id if principal is not None else None, model=model,
            route=route, status=status, code=code, total_ms=total_ms,
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, body=body)
