"""`ferry install-systemd`: put Ferry's systemd units and example config in place.

Writes, under a root directory ("/" for this host, or a staging tree for packaging):

- etc/systemd/system/ferry.service        always rewritten; ExecStart= runs the `ferry` script
                                          beside the given Python, User=/Group= the given user
- etc/systemd/system/ferry.service.d/gpu.conf   with `gpu` (exposes /dev/nvidia*)
- etc/systemd/system/ferry.socket         with `socket` (HTTP port socket activation)
- etc/ferry/ferry.toml                    only when absent: an admin's config is never replaced

and, on the live root only, creates the system user. The templates are the files in the
repository's systemd/ folder, so what is installed is exactly what the tests score and verify.
"""
from __future__ import annotations

import argparse
import logging
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from daemon.errors import ConfigError

__all__ = ["install", "add_arguments", "run", "main", "DEFAULT_TEMPLATES"]

log = logging.getLogger(__name__)

# Present in a source checkout and an editable install; a wheel install passes --templates.
DEFAULT_TEMPLATES = Path(__file__).resolve().parent.parent / "systemd"
UNIT_DIR = Path("etc/systemd/system")
CONFIG_FILE = Path("etc/ferry/ferry.toml")
STATE_DIR = "/var/lib/ferry"  # the user's home: StateDirectory=ferry
# systemd would expand %specifiers and $VARS and split on whitespace in ExecStart=; a path made
# of these characters needs no quoting at all.
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9._+@/-]*")
_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_EXEC_START = re.compile(r"^ExecStart=(\S+)", re.MULTILINE)


@dataclass(slots=True)
class _Planned:
    path: Path          # relative to the root
    text: str
    replace: bool       # False: keep an existing file


def install(prefix_root: Path = Path("/"), *, user: str = "ferry", python: str = sys.executable,
            dry_run: bool = False, gpu: bool = False, socket: bool = False,
            templates: Path | None = None) -> list[Path]:
    """Install the unit (and drop-ins, config) under `prefix_root`; return the files written.

    `dry_run` changes nothing on this host: no user is created and, when `prefix_root` is "/",
    no file is written (the returned paths are those that would be). Under any other root the
    files are still staged there, which touches nothing the running system uses.
    Raises ConfigError naming the option (user, python, templates) on bad input.
    """
    root = Path(prefix_root)
    live = root.resolve() == Path("/")
    _check_user(user)
    program = _ferry_program(python, must_exist=live and not dry_run)
    plan = _plan(DEFAULT_TEMPLATES if templates is None else Path(templates),
                 program, user, gpu=gpu, socket=socket)
    if live and not dry_run:
        _ensure_user(user)  # before the unit exists: a unit naming a missing user cannot start
    written: list[Path] = []
    for item in plan:
        target = root / item.path
        if not item.replace and target.exists():
            log.info("keeping existing %s", target)
            continue
        if live and dry_run:
            log.info("dry run: would write %s", target)
        else:
            _write(target, item.text)
            log.info("wrote %s", target)
        written.append(target)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `ferry install-systemd` (the CLI module wires this subcommand)."""
    parser.add_argument("--root", type=Path, default=Path("/"),
                        help="install under this root instead of / (packaging, tests)")
    parser.add_argument("--user", default="ferry", help="system user to run as (default ferry)")
    parser.add_argument("--python", default=sys.executable,
                        help="Python of the environment Ferry is installed in; ExecStart= runs "
                             "the `ferry` script beside it (default: this Python)")
    parser.add_argument("--templates", type=Path, default=None,
                        help=f"folder with ferry.service etc. (default {DEFAULT_TEMPLATES})")
    parser.add_argument("--gpu", action="store_true",
                        help="also install the GPU drop-in exposing /dev/nvidia*")
    parser.add_argument("--socket", action="store_true",
                        help="also install ferry.socket (HTTP port socket activation)")
    parser.add_argument("--dry-run", action="store_true",
                        help="change nothing on this host; list what would be written")


def run(args: argparse.Namespace) -> int:
    paths = install(args.root, user=args.user, python=args.python, dry_run=args.dry_run,
                    gpu=args.gpu, socket=args.socket, templates=args.templates)
    for path in paths:
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ferry install-systemd",
                                     description="Install Ferry's systemd unit and config.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return run(args)
    except ConfigError as exc:
        print(f"ferry install-systemd: {exc}", file=sys.stderr)
        return 2


def _check_user(user: str) -> None:
    if not _USER_NAME.fullmatch(user):
        raise ConfigError("user", f"{user!r} is not a valid system user name")
    if user == "root":
        raise ConfigError("user", "refusing to run Ferry as root; use an unprivileged user")


def _ferry_program(python: str, *, must_exist: bool) -> Path:
    interpreter = Path(python)
    if not interpreter.is_absolute():
        raise ConfigError("python", f"{python!r} must be an absolute path")
    # The venv's bin/ folder, not the resolved interpreter (a venv python is a symlink to the
    # system one, whose folder holds no `ferry`).
    program = interpreter.parent / "ferry"
    if not _PLAIN_PATH.fullmatch(str(program)):
        raise ConfigError("python", f"{program} holds characters systemd would interpret "
                                    "(spaces, %, $, quotes); install into a plain path "
                                    "such as /opt/ferry/venv")
    if must_exist and not os.access(program, os.X_OK):
        raise ConfigError("python", f"{program} is missing or not executable; "
                                    "pip install ferry into that environment first")
    return program


def _plan(templates: Path, program: Path, user: str, *, gpu: bool,
          socket: bool) -> list[_Planned]:
    unit = _EXEC_START.sub(lambda m: f"ExecStart={program}", _read(templates, "ferry.service"),
                           count=1)
    unit = re.sub(r"^User=.*$", f"User={user}", unit, count=1, flags=re.MULTILINE)
    unit = re.sub(r"^Group=.*$", f"Group={user}", unit, count=1, flags=re.MULTILINE)
    if f"ExecStart={program} " not in unit or f"\nUser={user}\n" not in unit:
        raise ConfigError("templates", f"{templates / 'ferry.service'} has no ExecStart=/User= "
                                       "lines to fill in")
    plan = [_Planned(UNIT_DIR / "ferry.service", unit, replace=True)]
    if gpu:
        plan.append(_Planned(UNIT_DIR / "ferry.service.d" / "gpu.conf",
                             _read(templates, "ferry-gpu.conf"), replace=True))
    if socket:
        plan.append(_Planned(UNIT_DIR / "ferry.socket", _read(templates, "ferry.socket"),
                             replace=True))
    plan.append(_Planned(CONFIG_FILE, _read(templates, "ferry.toml"), replace=False))
    return plan


def _read(templates: Path, name: str) -> str:
    try:
        return (templates / name).read_text()
    except OSError as exc:
        raise ConfigError("templates", f"cannot read {templates / name} ({exc.strerror}); "
                                       "pass --templates <ferry checkout>/systemd") from exc


def _write(target: Path, text: str) -> None:
    """Atomic replace, mode 0644: readers (systemd, `ferry serve`) never see half a file."""
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def _ensure_user(user: str) -> None:
    try:
        pwd.getpwnam(user)
        return
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        raise ConfigError("user", f"user {user!r} does not exist and useradd is not available; "
                                  "create it as a system user first")
    shell = next((s for s in ("/usr/sbin/nologin", "/sbin/nologin") if os.path.exists(s)),
                 "/bin/false")
    cmd = [useradd, "--system", "--user-group", "--home-dir", STATE_DIR, "--no-create-home",
           "--shell", shell, "--comment", "Ferry inference daemon", user]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ConfigError("user", f"useradd exited {done.returncode}: {done.stderr.strip()}")
    log.info("created system user %s", user)


if __name__ == "__main__":
    sys.exit(main())
