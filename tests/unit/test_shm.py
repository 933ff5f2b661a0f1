"""Shared memory: the arena allocator (exact offsets, coalescing, fragmentation, exhaustion,
threads), the reader's region map (bounds, registration) and reclaiming dead owners' segments.

Real POSIX segments under /dev/shm; every segment a test creates is removed by a finalizer."""
from __future__ import annotations

import os
import random
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest

from daemon import shm as S
from daemon.errors import Busy, FerryError, InvalidInput
from daemon.protocol import ShmLoc, TensorRef

pytestmark = pytest.mark.timeout(30)

DEAD_PID = 2 ** 22 + 123       # above Linux's pid_max: no such process can exist
DEAD_PID2 = 2 ** 22 + 456


def _uid() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def arenas() -> Iterator[Callable[..., S.Arena]]:
    """Factory of arenas that are closed and unlinked after the test."""
    made: list[S.Arena] = []

    def make(size: int, name: str | None = None) -> S.Arena:
        arena = S.Arena(name or f"fyt-{_uid()}", size)
        made.append(arena)
        return arena

    yield make
    for arena in made:
        arena.close(unlink=True)


@pytest.fixture
def shm_files() -> Iterator[Callable[..., Path]]:
    """Factory of plain files (or directories) in /dev/shm, removed after the test."""
    made: list[Path] = []

    def make(name: str, size: int = 4096, directory: bool = False) -> Path:
        path = S.SHM_DIR / name
        made.append(path)
        if directory:
            path.mkdir()
        else:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            os.ftruncate(fd, size)
            os.close(fd)
        return path

    yield make
    for path in made:
        if path.is_dir():
            path.rmdir()
        else:
            path.unlink(missing_ok=True)


@pytest.fixture
def instance() -> str:
    return f"t{_uid()}"


@pytest.fixture
def regions(instance) -> Iterator[S.RegionMap]:
    rm = S.RegionMap(instance)
    yield rm
    rm.close()


# ---- allocator --------------------------------------------------------------------------------

def test_blocks_are_64_byte_aligned_and_packed_first_fit(arenas):
    arena = arenas(4096)
    offsets = [arena.alloc(n) for n in (1, 64, 65, 100, 0, 128)]
    assert offsets == [0, 64, 128, 256, 384, 448]
    assert all(off % S.ALIGN == 0 for off in offsets)
    assert arena.used_bytes == 576 and arena.live_blocks == 6
    assert arena.free_bytes == 4096 - 576 and arena.high_water == 576


def test_size_is_rounded_up_to_the_alignment(arenas):
    arena = arenas(100)
    assert arena.size == 128 and (S.SHM_DIR / arena.name).stat().st_size == 128
    assert arena.alloc(128) == 0


def _full(arenas, blocks: int) -> tuple[S.Arena, list[int]]:
    arena = arenas(64 * blocks)
    offs = [arena.alloc(64) for _ in range(blocks)]
    assert offs == [64 * i for i in range(blocks)]
    return arena, offs


def test_freed_block_coalesces_with_the_following_run(arenas):
    arena, (a, b, c, d) = _full(arenas, 4)
    arena.free(b)
    arena.free(a)                      # a + b is one run of 128
    assert arena.alloc(128) == 0


def test_freed_block_coalesces_with_the_preceding_run(arenas):
    arena, (a, b, c, d) = _full(arenas, 4)
    arena.free(a)
    arena.free(b)                      # b joins a
    assert arena.alloc(128) == 0


def test_freed_block_coalesces_with_both_neighbours(arenas):
    arena, (a, b, c, d) = _full(arenas, 4)
    arena.free(a)
    arena.free(c)
    with pytest.raises(Busy):
        arena.alloc(192)
    arena.free(b)                      # a + b + c
    assert arena.alloc(192) == 0
    assert arena.used_bytes == 256


def test_coalescing_restores_one_run_after_freeing_in_any_order(arenas):
    arena, offs = _full(arenas, 16)
    random.Random(7).shuffle(offs)
    for off in offs:
        arena.free(off)
    assert arena.used_bytes == 0 and arena.live_blocks == 0
    assert arena.alloc(arena.size) == 0


def test_fragmented_arena_refuses_a_large_block_until_neighbours_are_freed(arenas):
    arena, offs = _full(arenas, 16)
    for off in offs[::2]:
        arena.free(off)
    assert arena.free_bytes == 512                  # plenty in total, at most 64 contiguous
    with pytest.raises(Busy) as err:
        arena.alloc(128)
    assert err.value.code == "shm_arena_full" and err.value.status == 503
    assert "512 free" in err.value.message
    assert arena.used_bytes == 512                  # the refusal changed nothing
    arena.free(offs[1])                             # [0, 64) + [64, 128) + [128, 192)
    assert arena.alloc(192) == 0


def test_exhaustion_raises_busy_at_once(arenas):
    arena = arenas(1024)
    assert arena.alloc(1024) == 0
    start = time.monotonic()
    for n in (1, 64, 1 << 30):
        with pytest.raises(Busy) as err:
            arena.alloc(n)
        assert err.value.code == "shm_arena_full"
    assert time.monotonic() - start < 1.0
    arena.free(0)
    assert arena.alloc(1) == 0


@pytest.mark.parametrize("bad", ["double", "never allocated", "inside a block", "past the end"])
def test_bad_free_is_refused_and_changes_nothing(arenas, bad):
    arena = arenas(1024)
    a, b = arena.alloc(128), arena.alloc(64)
    offset = {"double": a, "never allocated": 512, "inside a block": a + 64,
              "past the end": 4096}[bad]
    if bad == "double":
        arena.free(a)
    used, blocks = arena.used_bytes, arena.live_blocks
    with pytest.raises(InvalidInput) as err:
        arena.free(offset)
    assert err.value.code == "shm_bad_free" and err.value.status == 400
    assert (arena.used_bytes, arena.live_blocks) == (used, blocks)
    arena.free(b)
    if bad != "double":
        arena.free(a)
    assert arena.alloc(1024) == 0


def test_concurrent_alloc_and_free_never_overlap_live_blocks(arenas):
    arena = arenas(16 * 1024)              # small: the threads hit exhaustion as well
    live: dict[int, int] = {}              # offset -> end of every block a thread holds
    guard = threading.Lock()
    errors: list[BaseException] = []
    busy = [0]

    def claim(off: int, end: int) -> None:
        with guard:
            for o, e in live.items():
                if off < e and o < end:
                    raise AssertionError(f"[{off}, {end}) overlaps live [{o}, {e})")
            live[off] = end

    def worker(tid: int) -> None:
        rng = random.Random(tid)
        held: list[tuple[int, int]] = []
        mark = tid + 1
        try:
            for _ in range(1500):
                if held and (rng.random() < 0.45 or len(held) > 6):
                    off, n = held.pop(rng.randrange(len(held)))
                    # nobody else wrote into the block while this thread held it
                    assert bytes(arena.buf[off:off + n]) == bytes([mark]) * n
                    with guard:
                        del live[off]
                    arena.free(off)
                    continue
                n = rng.randint(1, 2048)
                try:
                    off = arena.alloc(n)
                except Busy:
                    busy[0] += 1
                    continue
                claim(off, off + (n + 63) // 64 * 64)
                arena.buf[off:off + n] = bytes([mark]) * n
                held.append((off, n))
            for off, n in held:
                assert bytes(arena.buf[off:off + n]) == bytes([mark]) * n
                with guard:
                    del live[off]
                arena.free(off)
        except BaseException as exc:   # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)            # interleave the threads finely, not one after another
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
    finally:
        sys.setswitchinterval(interval)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[0]
    assert arena.used_bytes == 0 and arena.live_blocks == 0
    assert arena.alloc(arena.size) == 0        # everything coalesced back into one run


def test_put_copies_an_array_into_a_fresh_block(arenas):
    arena = arenas(4096)
    first = arena.put(np.arange(3, dtype=np.int8))
    arr = np.arange(12, dtype=np.float32).reshape(3, 4).T      # not contiguous
    loc = arena.put(arr)
    assert first == ShmLoc(arena.name, 0, 3)
    assert loc == ShmLoc(arena.name, 64, 48)
    back = np.frombuffer(arena.buf, dtype=np.float32, count=12, offset=loc.offset)
    np.testing.assert_array_equal(back.reshape(4, 3), arr)
    del back
    assert arena.put(np.zeros((0, 3), np.float32)).nbytes == 0
    arena.free(loc.offset)
    assert arena.used_bytes == 64 + 64


def test_put_into_a_full_arena_raises_busy(arenas):
    arena = arenas(128)
    arena.put(np.zeros(30, np.float32))
    with pytest.raises(Busy):
        arena.put(np.zeros(30, np.float32))


def test_arena_names_are_validated(arenas):
    for bad in ("a/b", "../x", "", ".hidden", "x" * 201):
        with pytest.raises(ValueError):
            S.Arena(bad, 1024)
    arena = arenas(1024)
    with pytest.raises(FileExistsError):
        S.Arena(arena.name, 1024)


def test_failed_arena_leaves_no_segment_behind():
    name = f"fyt-{_uid()}"
    with pytest.raises(ValueError):
        S.Arena(name, 0)                    # nothing to map
    assert not (S.SHM_DIR / name).exists()


def test_close_unlinks_the_segment():
    arena = S.Arena(f"fyt-{_uid()}", 1024)
    path = S.SHM_DIR / arena.name
    assert path.exists()
    arena.close()
    assert not path.exists()
    arena.close()                           # twice is harmless


# ---- region map -------------------------------------------------------------------------------

def test_own_arenas_map_lazily_by_prefix(arenas, regions, instance):
    arena = arenas(4096, S.segment_name(instance, "eng", os.getpid()))
    assert arena.name == f"ferry-{instance}-eng-{os.getpid()}"
    loc = arena.put(np.arange(8, dtype=np.int64))
    assert regions.status() == []           # own arenas are not client regions
    arr = regions.array(TensorRef("x", "int64", (2, 4), shm=loc))
    np.testing.assert_array_equal(arr, np.arange(8).reshape(2, 4))
    arena.buf[loc.offset:loc.offset + 8] = np.int64(99).tobytes()
    assert arr[0, 0] == 99                   # a view of the segment, not a copy
    assert regions.region(arena.name) is regions.region(arena.name)
    del arr
    regions.forget(arena.name)
    assert bytes(regions.view(ShmLoc(arena.name, loc.offset, 8))) == np.int64(99).tobytes()


@pytest.mark.parametrize("name", ["client-x", "ferry-other-eng-1", "ferry-", "", "ferry-t"])
def test_unregistered_foreign_region_is_unknown(regions, name):
    with pytest.raises(InvalidInput) as err:
        regions.view(ShmLoc(name, 0, 1))
    assert err.value.code == "shm_unknown_region"


@pytest.mark.parametrize("suffix", ["x/../../../etc/passwd", "a/b", "a\0b", "a b"])
def test_own_prefix_names_that_are_not_segment_names_are_unknown(regions, instance, suffix):
    with pytest.raises(InvalidInput) as err:
        regions.view(ShmLoc(f"ferry-{instance}-{suffix}", 0, 1))
    assert err.value.code == "shm_unknown_region"


def test_own_prefix_name_without_a_segment_cannot_be_opened(regions, instance):
    with pytest.raises(InvalidInput) as err:
        regions.view(ShmLoc(f"ferry-{instance}-eng-{DEAD_PID}", 0, 1))
    assert err.value.code == "shm_bad_region"


def _client(arenas, size: int = 1024) -> S.Arena:
    seg = arenas(size)
    seg.buf[:] = bytes(range(256)) * (size // 256)
    return seg


def test_registered_window_reads_the_right_bytes(arenas, regions):
    seg = _client(arenas)
    region = regions.register("in0", "/" + seg.name, 128, 256)
    assert (region.key, region.offset, region.nbytes) == (seg.name, 128, 256)
    assert bytes(regions.view(ShmLoc("in0", 0, 4))) == bytes([128, 129, 130, 131])
    assert bytes(regions.view(ShmLoc("in0", 252, 4))) == bytes([124, 125, 126, 127])
    assert len(regions.view(ShmLoc("in0", 256, 0))) == 0
    assert regions.status() == [{"name": "in0", "key": seg.name, "offset": 128,
                                 "byte_size": 256}]


@pytest.mark.parametrize("offset,nbytes", [(200, 100), (0, 257), (256, 1), (-1, 4), (0, -1),
                                           (2 ** 62, 1)])
def test_view_outside_the_window_is_refused(arenas, regions, offset, nbytes):
    seg = _client(arenas)
    regions.register("in0", seg.name, 128, 256)
    with pytest.raises(InvalidInput) as err:
        regions.view(ShmLoc("in0", offset, nbytes))
    assert err.value.code == "shm_out_of_bounds"


def test_view_past_an_own_arena_is_refused(arenas, regions, instance):
    arena = arenas(1024, S.segment_name(instance, "eng"))
    with pytest.raises(InvalidInput) as err:
        regions.view(ShmLoc(arena.name, 1000, 64))
    assert err.value.code == "shm_out_of_bounds"


@pytest.mark.parametrize("offset,nbytes", [(900, 200), (1024, 1), (0, 1025)])
def test_window_beyond_the_segment_is_refused(arenas, regions, offset, nbytes):
    seg = _client(arenas)
    with pytest.raises(InvalidInput) as err:
        regions.register("in0", seg.name, offset, nbytes)
    assert err.value.code == "shm_out_of_bounds"
    assert regions.status() == []


def test_empty_segment_is_out_of_bounds(regions, shm_files):
    path = shm_files(f"fyt-{_uid()}", size=0)
    with pytest.raises(InvalidInput) as err:
        regions.register("in0", path.name, 0, 1)
    assert err.value.code == "shm_out_of_bounds"


@pytest.mark.parametrize("name,key,offset,nbytes", [
    ("bad name", "SEG", 0, 64),
    ("", "SEG", 0, 64),
    ("in/0", "SEG", 0, 64),
    ("in0", "a/b", 0, 64),
    ("in0", "/../etc/passwd", 0, 64),
    ("in0", "..", 0, 64),
    ("in0", "", 0, 64),
    ("in0", "ferry-x-eng-1", 0, 64),
    ("in0", "/ferry-x-eng-1", 0, 64),
    ("in0", "SEG", -1, 64),
    ("in0", "SEG", 0, 0),
    ("in0", f"fyt-missing-{DEAD_PID}", 0, 64),
])
def test_register_validates_its_arguments(arenas, regions, name, key, offset, nbytes):
    seg = _client(arenas)
    with pytest.raises(InvalidInput) as err:
        regions.register(name, key.replace("SEG", seg.name), offset, nbytes)
    assert err.value.code == "shm_bad_region"
    assert regions.status() == []


def test_register_refuses_taken_names(arenas, regions, instance):
    seg = _client(arenas)
    regions.register("in0", seg.name, 0, 64)
    for name in ("in0", f"ferry-{instance}-eng-1"):
        with pytest.raises(InvalidInput) as err:
            regions.register(name, seg.name, 0, 64)
        assert err.value.code == "shm_region_exists"
    regions.register("in1", seg.name, 64, 64)     # another window of the same segment is fine
    assert [r["name"] for r in regions.status()] == ["in0", "in1"]


def test_unregister_forgets_the_region(arenas, regions):
    seg = _client(arenas)
    regions.register("in0", seg.name, 0, 64)
    view = regions.view(ShmLoc("in0", 0, 8))
    del view
    regions.unregister("in0")
    assert regions.status() == []
    for call in (lambda: regions.view(ShmLoc("in0", 0, 8)), lambda: regions.unregister("in0")):
        with pytest.raises(InvalidInput) as err:
            call()
        assert err.value.code == "shm_unknown_region"
    regions.register("in0", seg.name, 64, 64)    # the name is free again
    assert bytes(regions.view(ShmLoc("in0", 0, 1))) == bytes([64])


def test_unregister_with_a_live_numpy_view_keeps_the_view_valid(arenas, regions):
    seg = _client(arenas)
    regions.register("in0", seg.name, 0, 256)
    arr = regions.array(TensorRef("x", "uint8", (4,), shm=ShmLoc("in0", 4, 4)))
    regions.unregister("in0")
    assert arr.tolist() == [4, 5, 6, 7]


def test_array_of_an_inline_tensor_is_an_internal_error(regions):
    with pytest.raises(FerryError) as err:
        regions.array(TensorRef("x", "uint8", (4,), frame=0))
    assert err.value.code == "internal_error"


# ---- reclaiming segments of dead owners ---------------------------------------------------------

def test_segment_name_carries_the_owner_pid(instance):
    assert S.segment_name(instance, "eng") == f"ferry-{instance}-eng-{os.getpid()}"
    assert S.segment_name(instance, "http0", 17) == f"ferry-{instance}-http0-17"


@pytest.fixture
def layout(shm_files, instance) -> dict[str, Path]:
    other = f"t{_uid()}"
    names = {
        "dead eng": f"ferry-{instance}-eng-{DEAD_PID}",
        "dead http": f"ferry-{instance}-http0-{DEAD_PID2}",
        "pid suffix trap": f"ferry-{instance}-eng-1{DEAD_PID}",     # ends with the digits only
        "live": f"ferry-{instance}-zmq-{os.getpid()}",
        "other instance dead": f"ferry-{other}-eng-{DEAD_PID}",
        "other instance live": f"ferry-{other}-eng-{os.getpid()}",
        "not ferry": f"fyt-{instance}-{DEAD_PID}",
        "no pid": f"ferry-{instance}-eng-abc",
        "unicode digit": f"ferry-{instance}-eng-\u00b2",
        "huge pid": f"ferry-{instance}-eng-{10 ** 20}",
    }
    return {k: shm_files(v) for k, v in names.items()}


def _left(layout: dict[str, Path]) -> set[str]:
    return {k for k, p in layout.items() if p.exists()}


def test_reclaim_one_pid_removes_exactly_its_segments(layout, instance):
    removed = S.reclaim(instance, DEAD_PID)
    assert removed == [layout["dead eng"].name]
    assert _left(layout) == set(layout) - {"dead eng"}
    assert S.reclaim(instance, DEAD_PID) == []


def test_reclaim_an_instance_removes_all_of_its_segments_and_nothing_else(layout, instance):
    removed = S.reclaim(instance)
    mine = {"dead eng", "dead http", "pid suffix trap", "live", "no pid", "unicode digit",
            "huge pid"}
    assert sorted(removed) == sorted(layout[k].name for k in mine)
    assert _left(layout) == set(layout) - mine


def test_reclaim_orphans_removes_only_segments_of_dead_owners(layout):
    removed = set(S.reclaim_orphans())
    dead = {"dead eng", "dead http", "pid suffix trap", "other instance dead"}
    assert {layout[k].name for k in dead} <= removed
    assert not ({p.name for k, p in layout.items() if k not in dead} & removed)
    assert _left(layout) == set(layout) - dead


def test_reclaim_skips_what_it_cannot_unlink(shm_files, instance):
    stuck = shm_files(f"ferry-{instance}-eng-{DEAD_PID}", directory=True)
    gone = shm_files(f"ferry-{instance}-http0-{DEAD_PID}")
    assert S.reclaim(instance, DEAD_PID) == [gone.name]
    assert stuck.is_dir()
    assert stuck.name not in S.reclaim_orphans()
    assert stuck.is_dir()
