"""`ferry tokens …` and `ferry users …`: API keys and admin users, written straight into the
state database. The daemon need not be running; a running one applies a change to its next
request (daemon.state.changes).

    ferry tokens create --name N --scopes infer,admin [--models a,b] [--rpm N] [--tpm N]
                        [--max-concurrent N] [--expires 30d|ISO] [--allow-ip CIDR,...] [--json]
    ferry tokens list [--all] [--json]
    ferry tokens show ID | revoke ID | rotate ID
    ferry users create NAME [--password-file F]     (else the password is read from stdin)
    ferry users list | delete NAME | passwd NAME

`create` and `rotate` print the key on stdout and nothing else (`KEY=$(ferry tokens create …)`);
it is shown this once. Everything else about the key goes to stderr.
"""
from __future__ import annotations

import argparse
import getpass
import json
import re
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from daemon.config import Config, load_config
from daemon.errors import ConfigError, InvalidInput

__all__ = ["add_parser", "parse_expiry", "require_credentials", "cmd_tokens", "cmd_users"]

_SPAN = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_expiry(value: Any, now: float) -> float:
    """Unix seconds for an expiry written as `30d` (s, m, h, d, w from now), an ISO 8601 time
    (naive means UTC) or Unix seconds."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InvalidInput("expires must be a duration like 30d, an ISO 8601 time or Unix "
                           "seconds", param="expires")
    if isinstance(value, (int, float)):
        return float(value)
    text = value.strip().lower()
    span = _SPAN.fullmatch(text)
    if span is not None:
        seconds = float(span.group(1)) * _UNIT_S[span.group(2)]
        if not 0 < seconds <= 100 * 365 * 86400:
            raise InvalidInput("expires must be between 1 s and 100 years away",
                               param="expires")
        return now + seconds
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidInput(f"expires {value!r:.40} is not a duration (30d, 12h), an ISO 8601 "
                           f"time or Unix seconds", param="expires") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def _csv(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


def add_parser(sub: Any, commands: dict[str, Callable[[argparse.Namespace], int]],
               config_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add `tokens` and `users` to the `ferry` subcommands (`sub` from add_subparsers)."""
    tokens = sub.add_parser("tokens", help="create, list, revoke and rotate API keys")
    tsub = tokens.add_subparsers(dest="action", required=True)
    create = tsub.add_parser("create", help="create a key (printed once)")
    create.add_argument("--name", required=True)
    create.add_argument("--scopes", default="infer", help="comma list of infer, admin")
    create.add_argument("--models", help="comma list of model names or patterns (default all)")
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--tpm", type=int, help="tokens per minute")
    create.add_argument("--max-concurrent", type=int, help="requests in flight at once")
    create.add_argument("--expires", help="30d, 12h, or an ISO 8601 time (default never)")
    create.add_argument("--allow-ip", help="comma list of addresses/CIDRs (default any)")
    lst = tsub.add_parser("list", help="list keys")
    lst.add_argument("--all", action="store_true", help="include revoked keys")
    for name in ("show", "revoke", "rotate"):
        tsub.add_parser(name, help=f"{name} a key").add_argument("id")
    users = sub.add_parser("users", help="admin users (for POST /admin/login)")
    usub = users.add_subparsers(dest="action", required=True)
    ucreate = usub.add_parser("create", help="create a user; password from stdin")
    ucreate.add_argument("name")
    ucreate.add_argument("--password-file", help="read the password from this file")
    passwd = usub.add_parser("passwd", help="change a password (ends the user's sessions)")
    passwd.add_argument("name")
    passwd.add_argument("--password-file")
    usub.add_parser("list", help="list users")
    usub.add_parser("delete", help="delete a user").add_argument("name")
    for p in [*tsub.choices.values(), *usub.choices.values()]:
        config_args(p)
        p.add_argument("--json", action="store_true", help="machine-readable output")
    commands["tokens"] = cmd_tokens
    commands["users"] = cmd_users


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, overrides={"paths.state_dir": args.state_dir})


def _run(args: argparse.Namespace, fn: Callable[[Any], Any]) -> Any:
    from daemon.state import run_with_state
    return run_with_state(_config(args).state_dir, fn)


def _err(text: str) -> None:
    print(f"ferry: {text}", file=sys.stderr)


def _show(key: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(key.to_dict(), indent=2))
        return
    expires = ("never" if key.expires_at is None else
               datetime.fromtimestamp(key.expires_at, timezone.utc).isoformat(timespec="seconds"))
    state = "revoked" if key.revoked_at is not None else (
        "expired" if key.expires_at is not None and key.expires_at <= time.time() else "active")
    print(f"{key.id}  {key.prefix}…  {key.name!r}  scopes={','.join(sorted(key.scopes))}  "
          f"models={','.join(key.models) if key.models else '*'}  rpm={key.limits.rpm or '-'}  "
          f"tpm={key.limits.tpm or '-'}  max_concurrent={key.limits.max_concurrent or '-'}  "
          f"allow_ips={','.join(key.allow_ips) or '*'}  expires={expires}  {state}")


def _secret(created: Any, as_json: bool, verb: str) -> None:
    if as_json:
        print(json.dumps({**created.key.to_dict(), "api_key": created.plaintext}, indent=2))
    else:
        print(created.plaintext)
    _err(f"{verb} API key {created.key.id} ({created.key.name!r}, scopes "
         f"{','.join(sorted(created.key.scopes))}); the key above is shown only this once")


def cmd_tokens(args: argparse.Namespace) -> int:
    if args.action == "create":
        kwargs = {"scopes": _csv(args.scopes), "models": _csv(args.models), "rpm": args.rpm,
                  "tpm": args.tpm, "max_concurrent": args.max_concurrent,
                  "allow_ips": _csv(args.allow_ip)}
        if args.expires is not None:
            kwargs["expires_at"] = parse_expiry(args.expires, time.time())
        created = _run(args, lambda st: st.keys.create(args.name, **kwargs))
        _secret(created, args.json, "created")
    elif args.action == "list":
        keys = _run(args, lambda st: st.keys.list(include_revoked=args.all))
        if args.json:
            print(json.dumps([k.to_dict() for k in keys], indent=2))
        for key in [] if args.json else keys:
            _show(key, False)
    elif args.action == "show":
        _show(_run(args, lambda st: st.keys.get(args.id)), args.json)
    elif args.action == "revoke":
        key = _run(args, lambda st: st.keys.revoke(args.id))
        _show(key, args.json)
        _err(f"API key {key.id} revoked; a running daemon refuses it within 2 s")
    elif args.action == "rotate":
        _secret(_run(args, lambda st: st.keys.rotate(args.id)), args.json, "rotated")
    return 0


def _password(args: argparse.Namespace) -> str:
    if args.password_file:
        try:
            return Path(args.password_file).read_text().rstrip("\r\n")
        except OSError as exc:
            raise InvalidInput(f"cannot read {args.password_file}: {exc.strerror}",
                               param="--password-file") from None
    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            raise InvalidInput("the passwords differ", param="password")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def cmd_users(args: argparse.Namespace) -> int:
    if args.action == "create":
        password = _password(args)
        user = _run(args, lambda st: st.users.create(args.name, password))
        _err(f"created admin user {user.username!r}")
    elif args.action == "passwd":
        password = _password(args)
        user = _run(args, lambda st: st.users.set_password(args.name, password))
        _err(f"password of {user.username!r} changed; their sessions have ended")
    elif args.action == "list":
        users = _run(args, lambda st: st.users.list())
        if args.json:
            print(json.dumps([{"username": u.username, "created_at": u.created_at}
                              for u in users], indent=2))
        for u in [] if args.json else users:
            print(u.username)
    elif args.action == "delete":
        _run(args, lambda st: st.users.delete(args.name))
        _err(f"deleted admin user {args.name!r}")
    return 0


def require_credentials(cfg: Config) -> None:
    """With auth required, refuse to start a daemon nobody could use: at least one active
    API key (or an admin user, who can mint keys over /admin) must exist."""
    from daemon.state import run_with_state

    async def usable(state: Any) -> bool:
        now = time.time()
        keys = await state.keys.list()
        if any(k.expires_at is None or k.expires_at > now for k in keys):
            return True
        return bool(await state.users.list())

    if not run_with_state(cfg.state_dir, usable):
        raise ConfigError("auth.required", (
            f"authentication is required but {cfg.state_dir} holds no active API key or admin "
            "user; create one first (with the same --config): ferry tokens create --name NAME "
            "--scopes infer,admin   (or: ferry users create NAME)"))
