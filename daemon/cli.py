"""The `ferry` command.

    ferry serve [--config FILE] [--host H] [--port P] [--workers W] [--demo]
    ferry demo --out DIR                      prepare the demo model repository
    ferry models list|show|load|unload [NAME] talk to the running daemon
    ferry install-systemd [--root DIR] [--user ferry] [--dry-run] [--gpu] [--socket]
    ferry tokens create|list|show|revoke|rotate   API keys (daemon/cli_tokens.py)
    ferry users create|list|delete|passwd         admin users
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any, Callable

from daemon.config import Config, check_exposure, load_config
from daemon.errors import ConfigError, FerryError

__all__ = ["main", "build_parser"]


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML configuration file")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--workers", type=int, help="HTTP frontend processes")
    p.add_argument("--model-repository", help="model repository directory")
    p.add_argument("--state-dir", help="state directory (SQLite, secrets)")
    p.add_argument("--runtime-dir", help="runtime directory (sockets)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferry", description="Ferry inference daemon")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the daemon")
    _config_args(serve)
    serve.add_argument("--demo", action="store_true",
                       help="prepare the demo models into the model repository first")
    demo = sub.add_parser("demo", help="prepare the demo model repository")
    demo.add_argument("--out", required=True)
    demo.add_argument("--force", action="store_true")
    models = sub.add_parser("models", help="inspect and control models of the running daemon")
    _config_args(models)
    models.add_argument("action", choices=["list", "show", "load", "unload"])
    models.add_argument("name", nargs="?")
    inst = sub.add_parser("install-systemd", help="install the systemd unit and config")
    from daemon.systemd_install import add_arguments
    add_arguments(inst)
    from daemon import cli_tokens
    cli_tokens.add_parser(sub, COMMANDS, _config_args)   # tokens, users
    return parser


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config, overrides={
        "server.host": args.host, "server.port": args.port, "server.workers": args.workers,
        "paths.model_repository": args.model_repository, "paths.state_dir": args.state_dir,
        "paths.runtime_dir": args.runtime_dir})


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load(args)
    check_exposure(cfg)
    if cfg.auth.required:
        from daemon.cli_tokens import require_credentials
        require_credentials(cfg)
    from daemon.logs import setup_logging
    setup_logging(cfg.logging.level, cfg.logging.format, role="supervisor")
    if args.demo:
        from daemon.demo import prepare_demo_models
        prepare_demo_models(cfg.model_repository)
    import uvloop
    from daemon.process import set_title
    from daemon.supervisor import Supervisor
    set_title("ferry-serve")
    import faulthandler
    faulthandler.enable()   # a watchdog SIGABRT prints every thread's stack to the journal
    uvloop.install()
    return asyncio.run(Supervisor(cfg, args.config).run())


def _control(cfg: Config, op: str, cargs: dict[str, Any]) -> dict[str, Any]:
    import uuid

    import zmq

    from daemon import protocol as P
    from daemon.errors import error_from_wire
    ctx: zmq.SyncContext = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{cfg.runtime_dir}/control.sock")
    try:
        sock.send_multipart(P.encode(P.Control(uuid.uuid4().hex, op, cargs)))
        if not sock.poll(120_000):
            raise FerryError(f"no daemon answers at {cfg.runtime_dir}/control.sock",
                             code="daemon_unreachable", status=503)
        reply, _ = P.decode(sock.recv_multipart())
    finally:
        sock.close(0)
    if not reply.ok:  # type: ignore[attr-defined]
        raise error_from_wire(reply.error)  # type: ignore[attr-defined]
    return reply.result  # type: ignore[attr-defined]


def cmd_models(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if args.action in ("load", "unload", "show") and not args.name:
        raise FerryError(f"ferry models {args.action} needs a model name", code="usage")
    if args.action == "list":
        for row in _control(cfg, "index", {})["models"]:
            print(f"{row['name']:24} {row['version']:>4}  {row['state']}"
                  + (f"  ({row['reason']})" if row.get("reason") else ""))
    elif args.action == "show":
        status = _control(cfg, "status", {})
        entry = status["models"].get(args.name)
        if entry is None:
            raise FerryError(f"model {args.name!r} is not loaded", code="model_not_found",
                             status=404)
        print(json.dumps(entry, indent=2))
    else:
        print(json.dumps(_control(cfg, args.action, {"model": args.name})))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from daemon.demo import prepare_demo_models
    for name in prepare_demo_models(Path(args.out), force=args.force):
        print(name)
    return 0


def cmd_install_systemd(args: argparse.Namespace) -> int:
    from daemon.systemd_install import run
    return run(args)


# cli_tokens.add_parser adds its subcommands here too, so this is a mutable dict.
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": cmd_serve, "models": cmd_models, "demo": cmd_demo,
    "install-systemd": cmd_install_systemd}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"ferry: {exc}", file=sys.stderr)
        return 2
    except FerryError as exc:
        print(f"ferry: {exc.message} [{exc.code}]", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
