"""daemon/ and frontends/ type-check cleanly under the repository's mypy settings (setup.cfg).

Runs mypy the way a developer does (`python -m mypy daemon frontends` from the repository root),
so the check here and the one by hand agree. mypy's incremental cache (.mypy_cache/, git-ignored)
makes later runs take a few seconds; a cold run takes about half a minute.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_daemon_and_frontends_type_check() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(REPO / "setup.cfg"),
         "--cache-dir", str(REPO / ".mypy_cache"), "daemon", "frontends"],
        cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, (
        f"mypy exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}")
