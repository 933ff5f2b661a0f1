"""Entry point of every child process: `python -m daemon.child <role> <json-args>`."""
from __future__ import annotations

import json
import sys

__all__ = ["main"]


def main(argv: list[str]) -> int:
    role, args = argv[0], json.loads(argv[1])
    if role == "engine":
        from engines.process import run_engine
        return run_engine(args)
    if role == "standby":
        from engines.standby import run_standby
        return run_standby(args)
    if role == "http":
        from frontends.http.server import run_http
        return run_http(args)
    if role == "zmq":
        from frontends.zmq.server import run_zmq
        return run_zmq(args)
    print(f"unknown role {role!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
