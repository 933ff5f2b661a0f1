"""The credential change counter: counts every bump from concurrent processes, reads 0 before
the first, and never raises on the request path."""
from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from daemon.state.changes import ChangeCounter

pytestmark = pytest.mark.timeout(60)
BUMPS = 200


def _bump_many(path: str) -> None:
    counter = ChangeCounter(Path(path))
    for _ in range(BUMPS):
        counter.bump()


def test_concurrent_bumps_are_all_counted(tmp_path):
    path = tmp_path / "credentials.changes"
    reader = ChangeCounter(path)
    assert reader.value() == 0                      # no file yet
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_bump_many, args=(str(path),)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(50)
        assert p.exitcode == 0
    assert reader.value() == 4 * BUMPS
    assert (os.stat(path).st_mode & 0o777) == 0o600
    reader.close()


def test_an_unusable_counter_reads_as_changed_and_bump_does_not_raise(tmp_path):
    path = tmp_path / "dir-not-file"
    path.mkdir()
    counter = ChangeCounter(path)
    assert counter.value() == -1                    # callers drop their caches on -1
    counter.bump()                                  # logged, not raised
    missing = ChangeCounter(tmp_path / "absent" / "x")
    missing.bump()
    assert missing.value() == 0
