"""Where a process spends its time under load: py-spy samples it, we sum the stacks.

`Profiler(pid, seconds).start()` runs `py-spy record --format raw` (collapsed stacks, one line
per distinct stack with its sample count) in the background while the caller drives load;
`finish()` waits and returns the hottest functions, by self time (the frame on top of the
stack) and by inclusive time (anywhere on the stack). `--native` is off: torch and ONNX Runtime
kernels show up as the Python line that called them, which is the level we can act on.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Profiler", "summarise", "pyspy_binary"]

log = logging.getLogger(__name__)


def pyspy_binary() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _frame_name(frame: str) -> str:
    # py-spy raw frames read "function (path/to/file.py:123)"; keep function and short file.
    func, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if parts else path
    return f"{func} ({short})"


def summarise(raw: str, top: int = 12) -> dict[str, Any]:
    """Collapsed stacks → {samples, self: [(name, share)], inclusive: [(name, share)]}."""
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += n
        self_t[frames[-1]] += n
        for name in set(frames):
            incl[name] += n
    share = (lambda c: [(name, round(k / total, 4)) for name, k in c.most_common(top)]) \
        if total else (lambda c: [])
    return {"samples": total, "self": share(self_t), "inclusive": share(incl)}


@dataclass
class Profiler:
    pid: int
    seconds: float
    out: Path
    label: str = ""
    proc: subprocess.Popen | None = field(default=None, repr=False)
    error: str = ""

    def start(self) -> Profiler:
        binary = pyspy_binary()
        if binary is None:
            self.error = "py-spy is not installed (pip install py-spy)"
            return self
        self.out.parent.mkdir(parents=True, exist_ok=True)
        argv = [binary, "record", "--pid", str(self.pid), "--duration", str(int(self.seconds)),
                "--rate", "100", "--format", "raw", "--output", str(self.out), "--nonblocking"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        return self

    def finish(self, timeout_s: float = 60.0) -> dict[str, Any]:
        if self.proc is not None:
            try:
                output, _ = self.proc.communicate(timeout=self.seconds + timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                output, _ = self.proc.communicate()
            if self.proc.returncode != 0 and not self.out.exists():
                self.error = output.decode(errors="replace").strip()[-500:]
        if self.error:
            log.warning("py-spy on %s (%d): %s", self.label, self.pid, self.error)
            return {"label": self.label, "error": self.error}
        summary = summarise(self.out.read_text(errors="replace"))
        return {"label": self.label, "pid": self.pid, **summary}
