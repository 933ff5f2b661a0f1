"""Session tokens for admins: HS256 JWTs signed with a per-installation secret.

The secret comes from configuration or from `<state_dir>/jwt.secret` (32 random bytes, hex,
mode 0600, generated on first use). Deleting the file signs every session out.
Verification pins the algorithm to HS256, so `alg: none` and algorithm-confusion tokens fail.
"""
from __future__ import annotations

import logging
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import jwt

from daemon.errors import ConfigError, FerryError, InvalidInput, Unauthorized
from daemon.state.db import ensure_state_dir
from daemon.state.keys import SCOPES

__all__ = ["JwtIssuer", "load_secret", "SECRET_FILENAME"]

log = logging.getLogger(__name__)

SECRET_FILENAME = "jwt.secret"
_SECRET_BYTES = 32
_ALGORITHM = "HS256"
_MAX_TTL_S = 7 * 24 * 3600


def load_secret(state_dir: Path, configured: str | bytes | None = None) -> bytes:
    """The signing secret: `configured` (≥ 32 bytes) if given, else the state-dir file."""
    if configured is not None:
        raw = configured.encode() if isinstance(configured, str) else bytes(configured)
        if len(raw) < _SECRET_BYTES:
            raise ConfigError("auth.jwt_secret", f"must be at least {_SECRET_BYTES} bytes")
        return raw
    state_dir = Path(state_dir)
    ensure_state_dir(state_dir)
    path = state_dir / SECRET_FILENAME
    if not path.exists():
        _create_secret_file(path)
    return _read_secret_file(path)


def _create_secret_file(path: Path) -> None:
    """Write to a private temp file, then link it into place: concurrent first starts agree
    on one secret, and no reader ever sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, secrets.token_bytes(_SECRET_BYTES).hex().encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
            log.info("generated JWT signing secret %s", path)
        except FileExistsError:
            pass  # another process won the race; use its secret
    except OSError as exc:
        raise FerryError(f"state path {path} is not writable: {exc.strerror}",
                         code="state_unwritable", status=500) from exc
    finally:
        tmp.unlink(missing_ok=True)


def _read_secret_file(path: Path) -> bytes:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("%s was readable by others (mode %o); tightening to 600", path, mode)
            os.chmod(path, 0o600)
        secret = bytes.fromhex(path.read_text().strip())
    except ValueError:
        secret = b""
    except OSError as exc:
        raise FerryError(f"cannot read {path}: {exc.strerror}", code="state_unwritable",
                         status=500) from exc
    if len(secret) < _SECRET_BYTES:
        raise FerryError(f"{path} is malformed; delete it to generate a new secret (this ends "
                         f"all admin sessions)", code="state_corrupt", status=500)
    return secret


def _invalid(message: str) -> Unauthorized:
    return Unauthorized(message, code="invalid_token")


class JwtIssuer:
    """Issues and verifies HS256 tokens carrying `sub`, `scopes` and an optional `ver`."""

    def __init__(self, secret: bytes, *, issuer: str = "ferry",
                 clock: Callable[[], float] = time.time) -> None:
        if len(secret) < _SECRET_BYTES:
            raise ConfigError("auth.jwt_secret", f"must be at least {_SECRET_BYTES} bytes")
        self._secret = secret
        self._issuer = issuer
        self._clock = clock

    def issue(self, sub: str, scopes: Iterable[str], ttl_s: int = 900, *,
              token_version: int | None = None) -> str:
        scope_list = sorted(set(scopes))
        if not scope_list or not set(scope_list) <= SCOPES:
            raise InvalidInput(f"scopes must be a non-empty subset of {sorted(SCOPES)}",
                               param="scopes")
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or not 0 < ttl_s <= _MAX_TTL_S:
            raise InvalidInput(f"ttl_s must be 1-{_MAX_TTL_S} seconds", param="ttl_s")
        if not isinstance(sub, str) or not sub:
            raise InvalidInput("sub must be a non-empty string", param="sub")
        now = int(self._clock())
        claims = {"iss": self._issuer, "sub": sub, "scopes": scope_list, "iat": now,
                  "exp": now + ttl_s, "jti": secrets.token_hex(8)}
        if token_version is not None:
            claims["ver"] = token_version
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM)

    def verify(self, token: str) -> dict:
        """The claims of a valid token; Unauthorized `invalid_token` or `token_expired`."""
        if not isinstance(token, str) or token.count(".") != 2:
            raise _invalid("token is not a JWT")
        try:
            claims = jwt.decode(token, self._secret, algorithms=[_ALGORITHM],
                                issuer=self._issuer,
                                options={"require": ["exp", "iat", "sub", "iss"]})
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("token has expired", code="token_expired") from exc
        except jwt.InvalidTokenError as exc:
            # The library's message names the failed check, never the token itself.
            raise _invalid(f"invalid token: {exc}") from exc
        scopes = claims.get("scopes")
        if not isinstance(scopes, list) or not set(scopes) <= SCOPES:
            raise _invalid("token scopes are malformed")
        if not isinstance(claims["sub"], str):
            raise _invalid("token subject is malformed")
        return claims
