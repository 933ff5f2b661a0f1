"""A change counter that tells every process on the host when credentials changed.

Frontend workers cache key and user records for a couple of seconds so that the hot path does
not query SQLite. Without a signal, a key revoked through one worker (or `ferry tokens revoke`)
would keep working in the others until their cache entries expired. Writers bump this counter
after committing; readers compare it on every request (one `pread` of 8 bytes, ~1 µs) and drop
their caches when it moved. The TTL stays as a backstop for changes made behind Ferry's back.

The counter is a little-endian u64 in a small file beside the database, incremented under
`flock`, so concurrent bumps from several processes are never lost.
"""
from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

__all__ = ["ChangeCounter"]

log = logging.getLogger(__name__)


class ChangeCounter:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def value(self) -> int:
        """The current count; 0 before the first bump. Never raises: an unreadable counter reads
        as a change (-1), so callers drop their caches rather than trust them."""
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            return int.from_bytes(os.pread(self._fd, 8, 0).ljust(8, b"\0"), "little")
        except FileNotFoundError:
            return 0
        except OSError as exc:
            log.warning("credential change counter %s unreadable: %s", self.path, exc)
            return -1

    def bump(self) -> None:
        """Count one change. Failure is logged, not raised: the change itself is committed, and
        other processes still see it when their cache entries expire."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            log.warning("cannot signal a credential change through %s: %s", self.path, exc)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            count = int.from_bytes(os.pread(fd, 8, 0).ljust(8, b"\0"), "little")
            os.pwrite(fd, ((count + 1) & (2**64 - 1)).to_bytes(8, "little"), 0)
        finally:
            os.close(fd)               # closing drops the lock

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
