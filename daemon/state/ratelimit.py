"""Per-key rate limits shared by every frontend process on the host.

Design: a fixed-size hash table in a memory-mapped file, one global `flock` around each update.
Each slot holds a key's two token buckets (requests/min, tokens/min) and a small table of
(pid, in-flight count) pairs for the concurrency cap.

Why not SQLite (`BEGIN IMMEDIATE` per check)? Measured on this project's 2-core dev box: ~11 µs
median uncontended, but when 2-4 processes collide the loser gets SQLITE_BUSY and SQLite's busy
handler sleeps 1, 2, 5, 10 … ms; worst cases were 79-132 ms per check. `flock` instead blocks
in the kernel and wakes the waiter as soon as the holder unlocks, and the critical section is a
few struct reads and writes: ~5-10 µs per check (see tests/unit/test_ratelimit.py, which asserts
the mean stays far below 1 ms). The table is ephemeral by nature (a restart refilling buckets is
harmless), so it belongs in the runtime directory (tmpfs), not in the durable database.

The clock is CLOCK_MONOTONIC, which is system-wide on Linux, so all processes agree on it.
Crash safety: the kernel drops a dead process's `flock`; its in-flight counts are reclaimed
when a cap would refuse, by checking whether each holder pid is still alive.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from daemon.errors import FerryError

__all__ = ["RateLimits", "Decision", "RateLimiter"]

log = logging.getLogger(__name__)

_MAGIC = b"FERRYRL1"
_HEADER = struct.Struct("<8sIII")            # magic, slots, holders per slot, slot size
_HEADER_SIZE = 64
_CORE = struct.Struct("<16s6d")              # digest, r_level, r_ts, r_cap, t_level, t_ts, t_cap
_BUCKETS = struct.Struct("<6d")
_HOLDER = struct.Struct("<ii")               # pid, count
_EMPTY = bytes(16)
_ALLOWED_UNLIMITED_RETRY = 0.0
_CONCURRENCY_RETRY_S = 1.0                   # no way to know when a slot frees; suggest 1 s


@dataclass(slots=True, frozen=True)
class RateLimits:
    """A key's limits; None means unlimited."""

    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None

    @property
    def unlimited(self) -> bool:
        return not self.rpm and not self.tpm and not self.max_concurrent


@dataclass(slots=True, frozen=True)
class Decision:
    """What the limiter decided, with the values for the response headers."""

    allowed: bool
    limit: int | None                 # requests per minute; None: no request limit
    remaining: int | None
    reset_s: float                    # seconds until the request bucket is full again
    retry_after_s: float              # 0 when allowed
    reason: str | None = None         # when refused: "requests" | "tokens" | "concurrency"
    tokens_limit: int | None = None
    tokens_remaining: int | None = None

    def headers(self) -> dict[str, str]:
        """`X-RateLimit-*` (and `Retry-After` when refused), integer seconds rounded up."""
        h: dict[str, str] = {}
        if self.limit is not None:
            h["X-RateLimit-Limit"] = str(self.limit)
            h["X-RateLimit-Remaining"] = str(max(0, self.remaining or 0))
            h["X-RateLimit-Reset"] = str(math.ceil(self.reset_s))
        if self.tokens_limit is not None:
            h["X-RateLimit-Limit-Tokens"] = str(self.tokens_limit)
            h["X-RateLimit-Remaining-Tokens"] = str(max(0, self.tokens_remaining or 0))
        if not self.allowed:
            h["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return h


def _refill(level: float, ts: float, cap: float, now: float) -> float:
    """Level after refilling at cap/60 per second since ts (a clock going back adds nothing)."""
    if now > ts:
        level += (now - ts) * cap / 60.0
    return min(level, cap)


def _wait(need: float, level: float, cap: float) -> float:
    return max(0.0, (need - level) * 60.0 / cap)


class RateLimiter:
    """Token buckets and concurrency caps in a shared memory-mapped table.

    Every public method returns a Decision or nothing; none raises on the hot path.
    Open one per process (or per thread group); after `fork` the lock fd is reopened.
    """

    def __init__(self, path: Path, *, slots: int = 4096, holders: int = 32,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self._clock = clock
        self._thread_lock = threading.Lock()
        self._full_warned = False
        self._fd, self._mm, self._slots, self._holders = self._open(slots, holders)
        self._slot_size = _CORE.size + self._holders * _HOLDER.size
        self._pid = os.getpid()

    # -- table file ---------------------------------------------------------------------
    def _open(self, slots: int, holders: int) -> tuple[int, mmap.mmap, int, int]:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise FerryError(f"rate-limit table {self.path} is not writable: {exc.strerror}",
                             code="state_unwritable", status=500) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                slots, holders = self._init_or_adopt(fd, slots, holders)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            size = _HEADER_SIZE + slots * (_CORE.size + holders * _HOLDER.size)
            return fd, mmap.mmap(fd, size), slots, holders
        except BaseException:
            os.close(fd)
            raise

    def _init_or_adopt(self, fd: int, slots: int, holders: int) -> tuple[int, int]:
        """First opener sizes the file; later ones adopt its layout whatever they asked for."""
        if os.fstat(fd).st_size == 0:
            slot_size = _CORE.size + holders * _HOLDER.size
            os.ftruncate(fd, _HEADER_SIZE + slots * slot_size)
            os.pwrite(fd, _HEADER.pack(_MAGIC, slots, holders, slot_size), 0)
            return slots, holders
        magic, slots, holders, slot_size = _HEADER.unpack(os.pread(fd, _HEADER.size, 0))
        expected = _HEADER_SIZE + slots * slot_size
        if (magic != _MAGIC or slot_size != _CORE.size + holders * _HOLDER.size
                or os.fstat(fd).st_size < expected):
            raise FerryError(f"rate-limit table {self.path} has an unknown layout; remove it "
                             f"(it holds no durable state)", code="ratelimit_table_invalid",
                             status=500)
        return slots, holders

    def close(self) -> None:
        self._mm.close()
        os.close(self._fd)

    def _lock(self) -> None:
        self._thread_lock.acquire()
        try:
            if os.getpid() != self._pid:
                # A forked child shares the parent's open file description, and flock would
                # let both hold it at once: take a description of our own.
                self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
                self._pid = os.getpid()
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise

    def _unlock(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._thread_lock.release()

    # -- slots --------------------------------------------------------------------------
    def _slot(self, key_id: str, limits: RateLimits | None, now: float) -> int | None:
        """Offset of key_id's slot; created (buckets full) when limits are given."""
        digest = hashlib.blake2b(key_id.encode(), digest_size=16).digest()
        home = int.from_bytes(digest[:8], "little") % self._slots
        victim = None
        for i in range(self._slots):
            off = _HEADER_SIZE + ((home + i) % self._slots) * self._slot_size
            found = self._mm[off:off + 16]
            if found == digest:
                return off
            if found == _EMPTY:
                victim = off
                break
            if victim is None and limits is not None and self._idle(off, now):
                victim = off
        if limits is None or victim is None:
            if limits is not None and not self._full_warned:
                self._full_warned = True
                log.warning("rate-limit table %s is full (%d keys busy); unknown keys pass "
                            "unlimited", self.path, self._slots)
            return None
        # Reusing an idle slot is invisible to its old key: idle means full buckets and no
        # holders, which is exactly what a fresh slot starts with.
        rpm, tpm = float(limits.rpm or 0), float(limits.tpm or 0)
        self._mm[victim:victim + self._slot_size] = bytes(self._slot_size)
        _CORE.pack_into(self._mm, victim, digest, rpm, now, rpm, tpm, now, tpm)
        return victim

    def _idle(self, off: int, now: float) -> bool:
        r_level, r_ts, r_cap, t_level, t_ts, t_cap = _BUCKETS.unpack_from(self._mm, off + 16)
        if r_cap and _refill(r_level, r_ts, r_cap, now) < r_cap:
            return False
        if t_cap and _refill(t_level, t_ts, t_cap, now) < t_cap:
            return False
        base = off + _CORE.size
        return all(_HOLDER.unpack_from(self._mm, base + h * _HOLDER.size)[1] <= 0
                   for h in range(self._holders))

    # -- buckets ------------------------------------------------------------------------
    def check(self, key_id: str, limits: RateLimits, cost_requests: int = 1,
              cost_tokens: int = 0) -> Decision:
        """Admit one request if both buckets allow it, debiting them atomically.

        The token bucket admits while the key is not in debt (level >= min(cost_tokens, tpm),
        at least 1); `cost_tokens` (e.g. the prompt length) is debited on admission and
        `charge_tokens` debits the rest once known, which may push the bucket into debt.
        """
        if not limits.rpm and not limits.tpm:
            return Decision(True, None, None, 0.0, _ALLOWED_UNLIMITED_RETRY)
        self._lock()
        try:
            now = self._clock()
            off = self._slot(key_id, limits, now)
            if off is None:
                return Decision(True, limits.rpm, limits.rpm, 0.0, 0.0)
            return self._admit(off, limits, now, cost_requests, cost_tokens)
        finally:
            self._unlock()

    def _admit(self, off: int, limits: RateLimits, now: float, cost_r: int,
               cost_t: int) -> Decision:
        r_cap, t_cap = float(limits.rpm or 0), float(limits.tpm or 0)
        r_level, r_ts, r_old, t_level, t_ts, t_old = _BUCKETS.unpack_from(self._mm, off + 16)
        # A bucket not tracked until now (slot made by acquire_concurrency, or the limit was
        # just added to the key) starts full, as a new slot does.
        r_level = r_cap if not r_old else r_level
        t_level = t_cap if not t_old else t_level
        r_level = _refill(r_level, r_ts, r_cap, now) if r_cap else 0.0
        t_level = _refill(t_level, t_ts, t_cap, now) if t_cap else 0.0
        r_ok = not r_cap or r_level >= cost_r
        t_need = max(1.0, min(float(cost_t), t_cap))
        t_ok = not t_cap or t_level >= t_need
        allowed = r_ok and t_ok
        if allowed:
            r_level -= cost_r if r_cap else 0
            t_level -= cost_t if t_cap else 0
        _BUCKETS.pack_into(self._mm, off + 16, r_level, now, r_cap, t_level, now, t_cap)
        retry = 0.0
        if not r_ok:
            retry = _wait(cost_r, r_level, r_cap)
        if not t_ok:
            retry = max(retry, _wait(t_need, t_level, t_cap))
        return Decision(
            allowed=allowed,
            limit=limits.rpm or None,
            remaining=math.floor(r_level) if r_cap else None,
            reset_s=_wait(r_cap, r_level, r_cap) if r_cap else 0.0,
            retry_after_s=retry,
            reason=None if allowed else ("requests" if not r_ok else "tokens"),
            tokens_limit=limits.tpm or None,
            tokens_remaining=math.floor(t_level) if t_cap else None,
        )

    def charge_tokens(self, key_id: str, n: int) -> None:
        """Debit n tokens (negative refunds) from the key's token bucket; no-op if untracked."""
        if not n:
            return
        self._lock()
        try:
            now = self._clock()
            off = self._slot(key_id, None, now)
            if off is None:
                return
            r_level, r_ts, r_cap, t_level, t_ts, t_cap = _BUCKETS.unpack_from(self._mm, off + 16)
            if not t_cap:
                return
            t_level = _refill(t_level, t_ts, t_cap, now) - n
            _BUCKETS.pack_into(self._mm, off + 16, r_level, r_ts, r_cap, min(t_level, t_cap),
                               now, t_cap)
        finally:
            self._unlock()

    # -- concurrency --------------------------------------------------------------------
    def acquire_concurrency(self, key_id: str, limit: int | None) -> Decision:
        """Take one in-flight slot for key_id; pair every allowed acquire with `release`."""
        if not limit:
            return Decision(True, None, None, 0.0, 0.0)
        self._lock()
        try:
            off = self._slot(key_id, RateLimits(max_concurrent=limit), self._clock())
            if off is None:
                return Decision(True, limit, limit, 0.0, 0.0)
            return self._take_holder(off + _CORE.size, limit)
        finally:
            self._unlock()

    def _take_holder(self, base: int, limit: int) -> Decision:
        total, own, free = self._scan_holders(base)
        if total >= limit or (own is None and free is None):
            # Only on refusal is it worth the syscalls to drop counts held by dead processes.
            self._reap_dead(base)
            total, own, free = self._scan_holders(base)
        slot = own if own is not None else free
        if total >= limit or slot is None:
            return Decision(False, limit, 0, 0.0, _CONCURRENCY_RETRY_S, reason="concurrency")
        pos = base + slot * _HOLDER.size
        count = _HOLDER.unpack_from(self._mm, pos)[1] if slot == own else 0
        _HOLDER.pack_into(self._mm, pos, self._pid, count + 1)
        return Decision(True, limit, limit - total - 1, 0.0, 0.0)

    def _scan_holders(self, base: int) -> tuple[int, int | None, int | None]:
        total, own, free = 0, None, None
        for h in range(self._holders):
            pid, count = _HOLDER.unpack_from(self._mm, base + h * _HOLDER.size)
            if count > 0:
                total += count
                if pid == self._pid:
                    own = h
            elif free is None:
                free = h
        return total, own, free

    def _reap_dead(self, base: int) -> None:
        for h in range(self._holders):
            pos = base + h * _HOLDER.size
            pid, count = _HOLDER.unpack_from(self._mm, pos)
            if count > 0 and pid != self._pid and not _alive(pid):
                log.warning("rate limiter: reclaiming %d in-flight slot(s) of dead pid %d",
                            count, pid)
                _HOLDER.pack_into(self._mm, pos, 0, 0)

    def release(self, key_id: str) -> None:
        """Give back one in-flight slot taken by this process; extra releases are ignored."""
        self._lock()
        try:
            off = self._slot(key_id, None, self._clock())
            if off is None:
                return
            base = off + _CORE.size
            for h in range(self._holders):
                pos = base + h * _HOLDER.size
                pid, count = _HOLDER.unpack_from(self._mm, pos)
                if pid == self._pid and count > 0:
                    _HOLDER.pack_into(self._mm, pos, pid if count > 1 else 0, count - 1)
                    return
        finally:
            self._unlock()

    def in_flight(self, key_id: str) -> int:
        """Requests in flight for key_id across all processes (for stats and tests)."""
        self._lock()
        try:
            off = self._slot(key_id, None, self._clock())
            return 0 if off is None else self._scan_holders(off + _CORE.size)[0]
        finally:
            self._unlock()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True
