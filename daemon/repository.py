"""The model repository on disk: `models/<name>/<version>/model.toml` and the version policy."""
from __future__ import annotations

import re
from pathlib import Path

from daemon.errors import ConfigError

__all__ = ["NAME_RE", "scan", "select_versions"]

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


def scan(root: Path) -> dict[str, dict[int, Path]]:
    """Every `<name>/<version>/model.toml` under `root` (hidden and temp directories skipped)."""
    out: dict[str, dict[int, Path]] = {}
    if not root.is_dir():
        return out
    for model_dir in sorted(root.iterdir()):
        if not model_dir.is_dir() or not NAME_RE.fullmatch(model_dir.name):
            continue
        versions = {}
        for vdir in model_dir.iterdir():
            # isascii: isdigit() alone accepts names such as '²' that int() refuses
            if vdir.is_dir() and vdir.name.isascii() and vdir.name.isdigit() \
                    and int(vdir.name) > 0 \
                    and (vdir / "model.toml").is_file():
                versions[int(vdir.name)] = vdir
        if versions:
            out[model_dir.name] = versions
    return out


def select_versions(available: dict[int, Path], policy: str) -> dict[int, Path]:
    """Apply a version policy: `latest:N`, `all`, or `specific:1,3`."""
    kind, _, arg = policy.partition(":")
    if policy == "all":
        return dict(available)
    if kind == "latest":
        # latest:0 would slice [-0:] and keep every version
        n = _positive_ints(policy, arg or "1")
        if len(n) != 1:
            raise ConfigError("repository.version_policy", f"bad policy {policy!r}")
        keep = sorted(available)[-n[0]:]
        return {v: available[v] for v in keep}
    if kind == "specific":
        wanted = set(_positive_ints(policy, arg))
        return {v: p for v, p in available.items() if v in wanted}
    raise ConfigError("repository.version_policy", f"unknown policy {policy!r}")


def _positive_ints(policy: str, arg: str) -> list[int]:
    items = [x.strip() for x in arg.split(",") if x.strip()]
    if not items or not all(x.isascii() and x.isdigit() and int(x) > 0 for x in items):
        raise ConfigError("repository.version_policy",
                          f"bad policy {policy!r}: versions must be positive integers")
    return [int(x) for x in items]


def fingerprint(version_dir: Path) -> tuple:
    """Cheap change detector for poll mode: (name, size, mtime) of every file in the version."""
    out = []
    for path in sorted(version_dir.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(version_dir).parts):
            continue   # engine caches (.trt-cache) and editor files are not the model
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if path.is_file():
            out.append((str(path.relative_to(version_dir)), st.st_size, st.st_mtime_ns))
    return tuple(out)
