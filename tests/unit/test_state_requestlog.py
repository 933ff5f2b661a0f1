"""Request log: batched appends off the request path, filters, pagination, retention."""
from __future__ import annotations

import asyncio
import functools
import sqlite3

import pytest

from daemon.errors import InvalidInput
from daemon.state import open_state
from daemon.state.requestlog import RequestLog

pytestmark = pytest.mark.timeout(30)


def async_test(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))
    return wrapper


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def rows_on_disk(tmp_path) -> int:
    with sqlite3.connect(tmp_path / "ferry.db") as conn:
        return conn.execute("SELECT COUNT(*) FROM request_log").fetchone()[0]


async def until(predicate, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)  # yield to the flusher while polling


def add(log: RequestLog, i: int, **kw) -> None:
    args = {"key_id": "k1", "model": "m", "route": "/v1/chat/completions", "status": 200,
            "queue_ms": 1.0, "ttft_ms": 5.0, "total_ms": 20.0, "prompt_tokens": 10,
            "completion_tokens": 3, **kw}
    log.append(f"req-{i}", **args)


@async_test
async def test_appends_are_buffered_and_written_in_one_batch(tmp_path):
    state = await open_state(tmp_path)
    try:
        for i in range(20):
            add(state.requests, i)
        # append() returned without touching SQLite
        assert state.requests.pending == 20 and rows_on_disk(tmp_path) == 0
        await until(lambda: state.requests.pending == 0)
        await until(lambda: rows_on_disk(tmp_path) == 20)
        # The commit is visible to other connections a moment before the flush counts it.
        await until(lambda: state.requests.flushes >= 1)
        assert state.requests.flushes == 1
    finally:
        await state.close()


@async_test
async def test_row_threshold_flushes_before_the_interval(tmp_path):
    state = await open_state(tmp_path)
    log = RequestLog(state.db, flush_interval_s=3600, flush_rows=5)
    log.start()
    try:
        for i in range(4):
            add(log, i)
        await asyncio.sleep(0)
        assert rows_on_disk(tmp_path) == 0
        add(log, 4)
        await until(lambda: rows_on_disk(tmp_path) == 5)
    finally:
        await log.close()
        await state.close()


@async_test
async def test_close_flushes_what_is_left(tmp_path):
    state = await open_state(tmp_path)
    add(state.requests, 1)
    await state.close()
    assert rows_on_disk(tmp_path) == 1


@async_test
async def test_filters_and_pagination(tmp_path):
    state = await open_state(tmp_path)
    clock = Clock()
    log = RequestLog(state.db, clock=clock)
    try:
        for i in range(10):
            clock.t += 10
            add(log, i, model="a" if i % 2 else "b", status=200 if i < 7 else 429,
                key_id="k1" if i < 5 else "k2", code=None if i < 7 else "rate_limited")
        page, cursor = await log.query(limit=4)
        assert [r.request_id for r in page] == ["req-9", "req-8", "req-7", "req-6"]
        page2, cursor2 = await log.query(limit=4, cursor=cursor)
        page3, cursor3 = await log.query(limit=4, cursor=cursor2)
        assert [r.request_id for r in page2 + page3] == [f"req-{i}" for i in range(5, -1, -1)]
        assert cursor3 is None
        assert {r.request_id for r in (await log.query(model="a"))[0]} == {
            "req-1", "req-3", "req-5", "req-7", "req-9"}
        errors = (await log.query(status=429))[0]
        assert [r.code for r in errors] == ["rate_limited"] * 3
        assert len((await log.query(key_id="k1"))[0]) == 5
        start = 1_700_000_000.0
        window = (await log.query(since=start + 30, until=start + 60))[0]
        assert [r.request_id for r in window] == ["req-4", "req-3", "req-2"]
        both = (await log.query(model="b", key_id="k2", status=429))[0]
        assert [r.request_id for r in both] == ["req-8"]
        record = page[0].to_dict()
        assert record["total_ms"] == 20.0 and record["prompt_tokens"] == 10
    finally:
        await log.close()
        await state.close()


@async_test
async def test_bad_query_parameters(tmp_path):
    state = await open_state(tmp_path)
    try:
        for kwargs, param in (({"limit": 0}, "limit"), ({"limit": 5000}, "limit"),
                              ({"cursor": "abc"}, "cursor"), ({"cursor": "-1"}, "cursor")):
            with pytest.raises(InvalidInput) as err:
                await state.requests.query(**kwargs)
            assert err.value.param == param
    finally:
        await state.close()


@async_test
async def test_bodies_only_when_configured_and_capped(tmp_path):
    state = await open_state(tmp_path)
    with_bodies = RequestLog(state.db, store_bodies=True, max_body_bytes=8)
    try:
        add(state.requests, 1, body='{"prompt": "secret stuff"}')
        add(with_bodies, 2, body='{"prompt": "kept"}')
        await state.requests.flush()
        await with_bodies.flush()
        records = {r.request_id: r.body for r in (await state.requests.query())[0]}
        assert records == {"req-1": None, "req-2": '{"prompt'}
    finally:
        await with_bodies.close()
        await state.close()


@async_test
async def test_retention_by_age_and_rows(tmp_path):
    state = await open_state(tmp_path)
    clock = Clock()
    log = RequestLog(state.db, clock=clock, max_age_s=3600, max_rows=5)
    try:
        for i in range(10):
            add(log, i)
            clock.t += 600
        await log.flush()
        # now = start + 6000: rows 0-3 (at +0..+1800) are older than an hour
        assert await log.prune(max_rows=10**6) == 4
        assert await log.prune() == 1              # then the newest 5 are kept
        kept = [r.request_id for r in (await log.query())[0]]
        assert kept == ["req-9", "req-8", "req-7", "req-6", "req-5"]
    finally:
        await log.close()
        await state.close()


@async_test
async def test_stalled_buffer_is_bounded(tmp_path):
    state = await open_state(tmp_path)
    log = RequestLog(state.db, max_pending=100)  # not started: nothing drains it
    try:
        for i in range(250):
            add(log, i)
        assert log.pending == 100 and log.dropped == 150
        await log.flush()
        newest = (await log.query(limit=1))[0][0]
        assert newest.request_id == "req-249"
    finally:
        await log.close()
        await state.close()


def test_close_during_a_flush_writes_every_row(tmp_path):
    """Shutdown closes the log while its background flush may be mid-transaction: no row may
    be lost (a cancelled flush used to leave the connection inside a transaction)."""
    async def main() -> int:
        state = await open_state(tmp_path)
        try:
            for round_ in range(20):
                for i in range(50):
                    state.requests.append(f"r{round_}-{i}", key_id=None, model=None,
                                          route="GET /x", status=200)
                state.requests._wake.set()                 # a flush starts in the background
                await asyncio.sleep(0)
            await state.requests.close()
            rows = await state.db.fetchall("SELECT COUNT(*) AS n FROM request_log")
            return rows[0]["n"]
        finally:
            await state.db.close()
    assert asyncio.run(main()) == 20 * 50


@async_test
async def test_a_full_database_is_retried_with_back_off_and_logged_once(tmp_path, caplog):
    """A real SQLITE_FULL (the connection's max_page_count pinned to the file's size): rows
    keep arriving for 1.5 s, yet the flusher warns once, backs off instead of retrying every
    10 ms, keeps the rows, and logs its recovery once when space returns."""
    state = await open_state(tmp_path)
    log = RequestLog(state.db, flush_interval_s=0.01, flush_rows=1, max_backoff_s=0.2)
    conn = state.db.conn
    try:
        pages = (await conn.execute_fetchall("PRAGMA page_count"))[0][0]
        await conn.execute(f"PRAGMA max_page_count = {pages}")
        caplog.set_level("INFO", logger="daemon.state.requestlog")
        log.start()
        loop = asyncio.get_running_loop()
        end, i = loop.time() + 1.5, 0
        while loop.time() < end:
            add(log, i, body="x" * 2000)      # a wake-up per row: must not cut the back-off
            i += 1
            await asyncio.sleep(0.005)
        warnings = [r for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and "full" in warnings[0].getMessage(), \
            [r.getMessage() for r in warnings]
        # 10 ms doubling to 0.2 s: ~10 attempts in 1.5 s, not ~150.
        assert log._failures <= 15, log._failures
        # Rows that fit the file's free space were written; the rest wait, none is lost.
        assert log.pending > 0 and log.pending + rows_on_disk(tmp_path) == i
        await conn.execute("PRAGMA max_page_count = 1073741823")
        await until(lambda: any("recovered" in r.getMessage() for r in caplog.records))
        await asyncio.sleep(0.1)             # later successful writes log nothing more
        recovered = [r for r in caplog.records if "recovered" in r.getMessage()]
        assert len(recovered) == 1 and log.pending == 0 and rows_on_disk(tmp_path) == i
        assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1
    finally:
        await log.close()
        await state.close()
