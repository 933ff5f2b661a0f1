"""systemd/ferry-router.service (vllm-router in front of N Ferry hosts) passes systemd's own
checks, and its command line is one vllm-router 0.1.17 accepts."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "ferry-router.service"
ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
needs_analyze = pytest.mark.skipif(not os.access(ANALYZE, os.X_OK),
                                   reason="systemd-analyze is not installed on this host")
BINARY = "/opt/ferry-router/venv/bin/vllm-router"


def _exec_start() -> str:
    (line,) = [l for l in UNIT.read_text().splitlines() if l.startswith("ExecStart=")]
    return line.removeprefix("ExecStart=")


def _staged(tmp_path: Path) -> Path:
    """The unit with ExecStart= running an executable that exists here (verify checks it)."""
    text = UNIT.read_text()
    assert text.count(f"ExecStart={BINARY} ") == 1
    staged = tmp_path / "ferry-router.service"
    staged.write_text(text.replace(f"ExecStart={BINARY}", f"ExecStart={sys.executable} -c pass"))
    return staged


@needs_analyze
def test_systemd_analyze_verify_is_clean(tmp_path) -> None:
    done = subprocess.run([ANALYZE, "verify", str(_staged(tmp_path))], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "" and done.stdout == "", done.stderr


@needs_analyze
def test_security_exposure_is_at_most_2() -> None:
    done = subprocess.run([ANALYZE, "security", "--offline=yes", str(UNIT)],
                          capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for ferry-router\.service: (\d+\.\d+)", done.stdout)
    assert m and float(m.group(1)) <= 2.0, done.stdout


def test_command_line_uses_flags_vllm_router_has() -> None:
    from tests.integration.router_proc import router_binary
    args = _exec_start().split()
    assert args[0] == BINARY and "$FERRY_HOSTS" in args
    assert args[args.index("--policy") + 1] == "cache_aware"
    binary, why = router_binary()
    if binary is None:
        pytest.skip(why)
    helptext = subprocess.run([str(binary), "--help"], capture_output=True, text=True,
                              timeout=60).stdout
    for flag in (a for a in args if a.startswith("--")):
        assert re.search(rf"(^|\s|\[){re.escape(flag)}[\s\]=]", helptext), flag
