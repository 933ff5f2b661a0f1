"""Shared-memory arenas: one POSIX segment per owning process, an allocator inside it, and a
reader-side map of regions with bounds-checked views.

- `Arena` is created by its owner at start and unlinked at stop. Blocks are 64-byte aligned;
  the allocator is first-fit over an offset-sorted free list with coalescing, guarded by a lock.
  Exhaustion raises `Busy` at once (callers fall back or push back), never blocks.
- `RegionMap` is what a reader holds: Ferry's own arenas (names with this instance's prefix) are
  mapped on first use; client regions must be registered first. Every view is bounds-checked
  against the region it names before a byte is read.
- `reclaim()` unlinks the segments of dead processes: the supervisor calls it for each child
  that exits and for the whole instance at shutdown.
"""
from __future__ import annotations

import bisect
import logging
import mmap
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from daemon.errors import Busy, FerryError, InvalidInput
from daemon.protocol import ShmLoc, TensorRef
from daemon.tensor_bytes import from_buffer

__all__ = ["SHM_DIR", "ALIGN", "Arena", "Region", "RegionMap", "pid_alive", "reclaim",
           "segment_name"]

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
ALIGN = 64
_KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}")


def segment_name(instance: str, role: str, pid: int | None = None) -> str:
    """Ferry's segment naming: `ferry-<instance>-<role>-<pid>`, so the pid finds the owner."""
    return f"ferry-{instance}-{role}-{os.getpid() if pid is None else pid}"


def _round_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Arena:
    """An owned shared-memory segment with an allocator. Thread-safe."""

    def __init__(self, name: str, size: int) -> None:
        if not _KEY_RE.fullmatch(name):
            raise ValueError(f"bad arena name {name!r}")
        self.name = name
        self.size = _round_up(size)
        self._path = SHM_DIR / name
        fd = os.open(self._path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, self.size)
            self._mm = mmap.mmap(fd, self.size)
        except BaseException:
            self._path.unlink()   # a segment we failed to set up must not outlive us
            raise
        finally:
            os.close(fd)
        self.buf = memoryview(self._mm)
        self._lock = threading.Lock()
        self._free_offsets: list[int] = [0]          # sorted start offsets of free runs
        self._free_sizes: dict[int, int] = {0: self.size}
        self._used: dict[int, int] = {}              # offset → size of live blocks
        self._used_total = 0                         # sum of _used, read without the lock
        self.high_water = 0

    # -- allocator --------------------------------------------------------------------------
    def alloc(self, nbytes: int) -> int:
        """Offset of a fresh block of at least `nbytes`; raises Busy when no run fits."""
        if nbytes < 0:
            raise ValueError(f"cannot allocate {nbytes} bytes")
        need = _round_up(max(nbytes, 1))
        with self._lock:
            for i, off in enumerate(self._free_offsets):
                run = self._free_sizes[off]
                if run >= need:
                    del self._free_offsets[i]
                    del self._free_sizes[off]
                    if run > need:
                        rest = off + need
                        self._free_offsets.insert(i, rest)
                        self._free_sizes[rest] = run - need
                    self._used[off] = need
                    self._used_total += need
                    self.high_water = max(self.high_water, self._used_total)
                    return off
            free = self.size - self._used_total
        raise Busy(f"shared-memory arena {self.name} is full ({nbytes} bytes requested, "
                   f"{free} free in fragments)", code="shm_arena_full")

    def free(self, offset: int) -> None:
        with self._lock:
            size = self._used.pop(offset, None)
            if size is None:
                raise InvalidInput(f"offset {offset} is not an allocated block of this arena",
                                   code="shm_bad_free")
            self._used_total -= size
            i = bisect.bisect_left(self._free_offsets, offset)
            # coalesce with the following run
            if i < len(self._free_offsets) and self._free_offsets[i] == offset + size:
                nxt = self._free_offsets.pop(i)
                size += self._free_sizes.pop(nxt)
            # coalesce with the preceding run
            if i > 0:
                prev = self._free_offsets[i - 1]
                if prev + self._free_sizes[prev] == offset:
                    self._free_sizes[prev] += size
                    return
            self._free_offsets.insert(i, offset)
            self._free_sizes[offset] = size

    def put(self, arr: np.ndarray) -> ShmLoc:
        """Copy `arr` into a fresh block; the caller frees it when the reader is done."""
        nbytes = arr.nbytes
        off = self.alloc(nbytes)
        try:
            dst = np.frombuffer(self.buf, dtype=arr.dtype, count=arr.size, offset=off)
            dst[...] = arr.reshape(-1)
        except BaseException:
            self.free(off)
            raise
        return ShmLoc(self.name, off, nbytes)

    @property
    def used_bytes(self) -> int:
        return self._used_total

    @property
    def free_bytes(self) -> int:
        return self.size - self.used_bytes

    @property
    def live_blocks(self) -> int:
        return len(self._used)

    def close(self, unlink: bool = True) -> None:
        self.buf.release()
        try:
            self._mm.close()
        except BufferError:   # a numpy view still alive; unlinking is what matters
            pass
        if unlink:
            try:
                self._path.unlink()
            except FileNotFoundError:
                pass


@dataclass(slots=True)
class Region:
    name: str            # public name used in references
    key: str             # POSIX shm key (file under /dev/shm)
    offset: int          # start of the usable window inside the segment
    nbytes: int          # size of the window
    mm: mmap.mmap
    view: memoryview


class RegionMap:
    """Reader-side map of regions. Ferry's own arenas (prefix `ferry-<instance>-`) map lazily;
    other regions must be registered. Not thread-safe: one per event loop or compute thread."""

    def __init__(self, instance: str) -> None:
        self._own_prefix = f"ferry-{instance}-"
        self._regions: dict[str, Region] = {}

    def register(self, name: str, key: str, offset: int, nbytes: int) -> Region:
        """Map window [offset, offset+nbytes) of segment `key` under the public `name`."""
        key = key.lstrip("/")
        if not isinstance(name, str) or not _KEY_RE.fullmatch(name):
            raise InvalidInput(f"invalid region name {name!r}", code="shm_bad_region")
        if not _KEY_RE.fullmatch(key) or key.startswith("ferry-"):
            raise InvalidInput(f"invalid shared-memory key {key!r}", code="shm_bad_region")
        if name in self._regions or name.startswith(self._own_prefix):
            raise InvalidInput(f"region {name!r} is already registered",
                               code="shm_region_exists")
        if offset < 0 or nbytes <= 0:
            raise InvalidInput("region offset must be >= 0 and byte size > 0",
                               code="shm_bad_region")
        region = self._map(name, key, offset, nbytes)
        self._regions[name] = region
        return region

    def _map(self, name: str, key: str, offset: int, nbytes: int | None) -> Region:
        try:
            # O_NOFOLLOW: a client's key must not lead through a symlink to another file
            fd = os.open(SHM_DIR / key, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            raise InvalidInput(f"shared-memory segment {key!r} cannot be opened: "
                               f"{exc.strerror}", code="shm_bad_region") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):   # a FIFO, device or directory is no segment
                raise InvalidInput(f"shared-memory segment {key!r} is not a regular file",
                                   code="shm_bad_region")
            size = st.st_size
            if nbytes is None:
                nbytes = size - offset
            if size == 0 or offset + nbytes > size:
                raise InvalidInput(f"region {name!r} [{offset}, {offset + nbytes}) exceeds the "
                                   f"segment size {size}", code="shm_out_of_bounds")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return Region(name, key, offset, nbytes, mm, memoryview(mm))

    def unregister(self, name: str) -> None:
        region = self._regions.pop(name, None)
        if region is None:
            raise InvalidInput(f"region {name!r} is not registered", code="shm_unknown_region")
        self._close(region)

    @staticmethod
    def _close(region: Region) -> None:
        region.view.release()
        try:
            region.mm.close()
        except BufferError:
            pass   # a live numpy view pins it; it closes when garbage-collected

    def status(self) -> list[dict[str, Any]]:   # the records a RegionReply carries
        return [{"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.nbytes}
                for r in self._regions.values() if not r.name.startswith(self._own_prefix)]

    def check_client(self, name: str) -> None:
        """Refuse a client's reference to anything but a region registered through the
        shared-memory API: Ferry's own arenas are never addressable by a client."""
        region = self._regions.get(name)
        if region is None or name.startswith(self._own_prefix):
            raise InvalidInput(f"Unable to find system shared memory region: {name!r}",
                               code="shm_unknown_region")

    def forget_own(self, keep: set[str]) -> None:
        """Unmap every one of Ferry's own arenas not named in `keep` (their owners died or
        were replaced); each mapping holds a descriptor and the dead segment's pages."""
        for name in [n for n in self._regions if n.startswith(self._own_prefix)]:
            if name not in keep:
                self.forget(name)

    def forget_dead(self) -> None:
        """Unmap Ferry's own arenas whose owner process (the name's pid suffix) is gone."""
        for name in [n for n in self._regions if n.startswith(self._own_prefix)]:
            if not _owner_alive(name):
                self.forget(name)

    def forget(self, name: str) -> None:
        """Drop a mapping of one of Ferry's own arenas (its owner died or was replaced)."""
        region = self._regions.pop(name, None)
        if region is not None:
            self._close(region)

    def region(self, name: str) -> Region:
        region = self._regions.get(name)
        if region is None:
            # the name becomes a path under /dev/shm: '/' or NUL in it must never reach open()
            if not name.startswith(self._own_prefix) or not _KEY_RE.fullmatch(name):
                raise InvalidInput(f"Unable to find system shared memory region: {name!r}",
                                   code="shm_unknown_region")
            region = self._map(name, name, 0, None)
            self._regions[name] = region
        return region

    def view(self, loc: ShmLoc) -> memoryview:
        """The bytes `loc` names, after checking they lie inside the region's window."""
        region = self.region(loc.region)
        if loc.offset < 0 or loc.nbytes < 0 or loc.offset + loc.nbytes > region.nbytes:
            raise InvalidInput(
                f"shared-memory reference [{loc.offset}, {loc.offset + loc.nbytes}) is outside "
                f"region {loc.region!r} of {region.nbytes} bytes", code="shm_out_of_bounds")
        start = region.offset + loc.offset
        return region.view[start:start + loc.nbytes]

    def array(self, ref: TensorRef) -> np.ndarray:
        """A zero-copy numpy view of a tensor held in shared memory."""
        if ref.shm is None:
            raise FerryError("tensor is not in shared memory", code="internal_error")
        return from_buffer(ref.name, ref.dtype, ref.shape, self.view(ref.shm))

    def close(self) -> None:
        for region in list(self._regions.values()):
            self._close(region)
        self._regions.clear()


def _owner_alive(name: str) -> bool:
    pid_text = name.rsplit("-", 1)[-1]
    # isdigit() alone accepts '²' and other digits int() refuses
    if not (pid_text.isascii() and pid_text.isdigit()) or len(pid_text) > 10:
        return True
    return pid_alive(int(pid_text))


def pid_alive(pid: int) -> bool:
    """False only when no process has `pid` (another user's process counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        pass
    return True


def reclaim(instance: str, pid: int | None = None) -> list[str]:
    """Unlink Ferry segments of `instance` (only those of `pid` when given). Returns names."""
    removed: list[str] = []
    prefix = f"ferry-{instance}-"
    try:
        entries = list(SHM_DIR.iterdir())
    except FileNotFoundError:
        return removed
    for path in entries:
        name = path.name
        if not name.startswith(prefix):
            continue
        if pid is not None and not name.endswith(f"-{pid}"):
            continue
        if _unlink(path):
            removed.append(name)
    return removed


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:   # another user's file in sticky /dev/shm, or a directory
        log.warning("cannot remove shared-memory segment %s: %s", path.name, exc.strerror)
        return False


def reclaim_orphans() -> list[str]:
    """Unlink Ferry segments of any instance whose owning process no longer exists (left by a
    supervisor that was itself killed with SIGKILL)."""
    removed: list[str] = []
    try:
        entries = list(SHM_DIR.iterdir())
    except FileNotFoundError:
        return removed
    for path in entries:
        name = path.name
        if not name.startswith("ferry-"):
            continue
        pid_text = name.rsplit("-", 1)[-1]
        if not (pid_text.isascii() and pid_text.isdigit()) or _owner_alive(name):
            continue
        if _unlink(path):
            removed.append(name)
    return removed
