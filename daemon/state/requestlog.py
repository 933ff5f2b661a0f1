"""The request log: one row per finished request, written in batches off the request path.

`append` only puts a tuple in a memory buffer; a background task writes the buffer in one
transaction every `flush_interval_s` (default 100 ms) or as soon as `flush_rows` rows are
waiting, so a request never waits for a SQLite write. If the database stalls, the buffer is
capped at `max_pending` rows and the oldest are dropped (and counted) rather than growing
without bound. Retention (`max_age_s`, `max_rows`) is applied by `prune`, which the flush task
also runs every `prune_interval_s`.

A failing write (a full disk, a read-only state directory) is retried with exponential
back-off, from `flush_interval_s` doubling up to `max_backoff_s` (30 s), and logged once per
condition: one warning when writes start failing (or fail differently), one line when they
recover, not one every 100 ms.
"""
from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from daemon.errors import FerryError, InvalidInput
from daemon.state.db import Database

__all__ = ["RequestRecord", "RequestLog"]

log = logging.getLogger(__name__)

_COLUMNS = ("ts", "request_id", "key_id", "model", "route", "status", "code", "queue_ms",
            "ttft_ms", "total_ms", "prompt_tokens", "completion_tokens", "body")
_INSERT = (f"INSERT INTO request_log ({', '.join(_COLUMNS)}) "
           f"VALUES ({', '.join('?' for _ in _COLUMNS)})")
_MAX_LIMIT = 1000


@dataclass(slots=True, frozen=True)
class RequestRecord:
    id: int
    ts: float
    request_id: str
    key_id: str | None
    model: str | None
    route: str
    status: int
    code: str | None
    queue_ms: float | None
    ttft_ms: float | None
    total_ms: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    body: str | None

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


class RequestLog:
    """Batched writer and reader of `request_log`. Call `start()` in the loop, `close()` last."""

    def __init__(self, db: Database, *, store_bodies: bool = False, max_body_bytes: int = 65536,
                 flush_interval_s: float = 0.1, flush_rows: int = 256, max_pending: int = 50_000,
                 max_age_s: float | None = None, max_rows: int | None = None,
                 prune_interval_s: float = 60.0, max_backoff_s: float = 30.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._store_bodies = store_bodies
        self._max_body = max_body_bytes
        self._interval = flush_interval_s
        self._flush_rows = flush_rows
        self._max_pending = max_pending
        self._max_age_s, self._max_rows = max_age_s, max_rows
        self._prune_interval = prune_interval_s
        self._clock = clock
        self._pending: list[tuple] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._flush_lock = asyncio.Lock()
        self._closing = False
        self._max_backoff = max_backoff_s
        self._failure: str | None = None     # the condition writes fail with, while they do
        self._failures = 0
        self.dropped = 0
        self.flushes = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="requestlog")

    def append(self, request_id: str, *, key_id: str | None, model: str | None, route: str,
               status: int, code: str | None = None, queue_ms: float | None = None,
               ttft_ms: float | None = None, total_ms: float | None = None,
               prompt_tokens: int | None = None, completion_tokens: int | None = None,
               body: str | bytes | None = None) -> None:
        """Buffer one row; never blocks, never raises for a full buffer."""
        if body is not None and self._store_bodies:
            raw = body.encode() if isinstance(body, str) else body
            body = raw[:self._max_body].decode("utf-8", "replace")
        else:
            body = None
        self._pending.append((self._clock(), request_id, key_id, model, route, int(status), code,
                              queue_ms, ttft_ms, total_ms, prompt_tokens, completion_tokens,
                              body))
        if len(self._pending) > self._max_pending:
            excess = len(self._pending) - self._max_pending
            del self._pending[:excess]
            self.dropped += excess
        if len(self._pending) >= self._flush_rows:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush(self) -> int:
        """Write every buffered row now; returns how many were written."""
        async with self._flush_lock:
            rows, self._pending = self._pending, []
            if not rows:
                return 0
            try:
                async with self._db.transaction() as conn:
                    await conn.executemany(_INSERT, rows)
            except BaseException:
                # Put them back (ahead of newer rows): the next flush, or close(), retries.
                self._pending[:0] = rows
                raise
            self.flushes += 1
            return len(rows)

    async def _run(self) -> None:
        last_prune = self._clock()
        while not self._closing:
            await self._pause()
            try:
                await self.flush()
                if self._clock() - last_prune >= self._prune_interval:
                    last_prune = self._clock()
                    await self.prune()
            except (FerryError, sqlite3.Error) as exc:
                self._failed(exc)
            else:
                self._recovered()

    def _backoff(self) -> float:
        """Seconds until the next write: the interval, doubled per consecutive failure."""
        if not self._failures:
            return self._interval
        return min(self._max_backoff, self._interval * 2.0 ** min(self._failures, 32))

    async def _pause(self) -> None:
        """Wait for the next write. While writes fail, a full buffer's wake-ups do not cut the
        back-off short (they would retry on every request); closing always does."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._backoff()
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                return
            self._wake.clear()
            if not self._failures:
                return

    def _failed(self, exc: Exception) -> None:
        self._failures += 1
        condition = f"{type(exc).__name__}: {exc}"
        if condition != self._failure:
            self._failure = condition
            log.warning("request log: write failed, %d rows waiting; retrying with back-off "
                        "up to %g s: %s", self.pending, self._max_backoff, exc)

    def _recovered(self) -> None:
        if self._failure is not None:
            log.info("request log: writes recovered after %d failed attempts (%s)",
                     self._failures, self._failure)
        self._failure, self._failures = None, 0

    async def close(self) -> None:
        """Stop the background task and write what is left. The task is asked to stop, not
        cancelled: a flush cut off half-way would leave rows unwritten."""
        if self._task is not None:
            self._closing = True
            self._wake.set()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.flush()
        if self.dropped:
            log.warning("request log: %d rows were dropped while the database stalled",
                        self.dropped)

    async def query(self, *, model: str | None = None, status: int | None = None,
                    key_id: str | None = None, since: float | None = None,
                    until: float | None = None, limit: int = 100,
                    cursor: str | None = None) -> tuple[list[RequestRecord], str | None]:
        """Newest first. Returns (records, next_cursor); pass next_cursor for the next page."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= _MAX_LIMIT:
            raise InvalidInput(f"limit must be 1-{_MAX_LIMIT}", param="limit")
        where, params = _filters(model, status, key_id, since, until, cursor)
        await self.flush()
        sql = "SELECT * FROM request_log"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = await self._db.fetchall(sql + " ORDER BY id DESC LIMIT ?", (*params, limit + 1))
        records = [RequestRecord(**{k: r[k] for k in r.keys()}) for r in rows[:limit]]
        next_cursor = str(records[-1].id) if len(rows) > limit else None
        return records, next_cursor

    async def prune(self, *, max_age_s: float | None = None, max_rows: int | None = None) -> int:
        """Delete rows older than max_age_s and beyond the newest max_rows; returns the count.

        Defaults to the retention given at construction.
        """
        max_age_s = self._max_age_s if max_age_s is None else max_age_s
        max_rows = self._max_rows if max_rows is None else max_rows
        deleted = 0
        async with self._db.transaction() as conn:
            if max_age_s is not None:
                cur = await conn.execute("DELETE FROM request_log WHERE ts < ?",
                                         (self._clock() - max_age_s,))
                deleted += cur.rowcount
            if max_rows is not None:
                cur = await conn.execute(
                    "DELETE FROM request_log WHERE id <= (SELECT id FROM request_log "
                    "ORDER BY id DESC LIMIT 1 OFFSET ?)", (max_rows,))
                deleted += cur.rowcount
        if deleted:
            log.info("request log: pruned %d rows", deleted)
        return deleted


def _filters(model: str | None, status: int | None, key_id: str | None, since: float | None,
             until: float | None, cursor: str | None) -> tuple[list[str], list]:
    where: list[str] = []
    params: list = []
    for column, value in (("model", model), ("status", status), ("key_id", key_id)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if since is not None:
        where.append("ts >= ?")
        params.append(float(since))
    if until is not None:
        where.append("ts < ?")
        params.append(float(until))
    if cursor is not None:
        # ASCII ("²".isdigit()) and within SQLite's 64-bit integers
        if not (cursor.isascii() and cursor.isdigit()) or len(cursor) > 18:
            raise InvalidInput("cursor is malformed", param="cursor")
        where.append("id < ?")
        params.append(int(cursor))
    return where, params
