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
            if vdir.is_dir() and vdir.name.isdigit() and int(vdir.name) > 0 \
                    and (vdir / "model.toml").is_file():
                versions[int(vdir.name)] = vdir
        if versions:
            out[model_dir.name] = versions
    return out


def select_versions(available: dict[int, Path], policy: str) -> dict[int, Path]:
    """Apply a version policy: `latest:N`, `all`, or `specific:1,3`."""
    kind, _, arg = policy.partition(":")
    if kind == "all":
        return dict(available)
    if kind == "latest":
        n = int(arg or "1")
        keep = sorted(available)[-n:]
        return {v: available[v] for v in keep}
    if kind == "specific":
        wanted = {int(x) for x in arg.split(",") if x.strip()}
        return {v: p for v, p in available.items() if v in wanted}
    raise ConfigError("repository.version_policy", f"unknown policy {policy!r}")
