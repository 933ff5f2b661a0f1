"""Batch jobs: persistence of jobs, their items, results, and webhook deliveries.

One batch runner per state directory (the supervisor's) claims items, runs them and records
results; everything it needs to resume after a crash or restart is here. `claim_unfinished()`
puts items that were running back to pending.

Webhooks: when a job reaches a terminal state, a delivery row is written in the same
transaction. A sender `claim_webhook`s it (a lease, so two processes never send at once),
POSTs, then `record_webhook_attempt`s. Once `delivered_at` is set it is never sent again, across
any restart. A crash between the POST and the record re-sends after the lease ends, so
receivers should de-duplicate on `X-Ferry-Delivery` (the job id): at-least-once on the wire,
once as far as a de-duplicating receiver can tell.
"""
from __future__ import annotations

import enum
import hashlib
import hmac
import json
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiosqlite

from daemon.errors import FerryError, InvalidInput
from daemon.state.db import Database

__all__ = ["JobStatus", "ItemStatus", "BatchJob", "BatchItem", "WebhookDelivery", "BatchStore",
           "sign", "signature_header", "verify_signature", "webhook_body"]

log = logging.getLogger(__name__)

_MAX_ITEMS = 50_000
_MAX_ATTEMPTS = 8


class JobStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


class ItemStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


_OPEN_JOB = (JobStatus.PENDING.value, JobStatus.RUNNING.value)


@dataclass(slots=True, frozen=True)
class BatchJob:
    id: str
    route: str
    model: str | None
    status: JobStatus
    total: int
    counts: dict[str, int]            # items per ItemStatus value
    webhook_url: str | None
    metadata: dict | None
    created_at: float
    updated_at: float
    completed_at: float | None

    def to_dict(self) -> dict:
        return {"id": self.id, "route": self.route, "model": self.model,
                "status": self.status.value, "total": self.total, "counts": dict(self.counts),
                "webhook_url": self.webhook_url, "metadata": self.metadata,
                "created_at": self.created_at, "updated_at": self.updated_at,
                "completed_at": self.completed_at}


@dataclass(slots=True, frozen=True)
class BatchItem:
    job_id: str
    idx: int
    custom_id: str | None
    request: dict
    status: ItemStatus
    result: object | None
    error: object | None
    attempts: int


@dataclass(slots=True, frozen=True)
class WebhookDelivery:
    job_id: str
    url: str
    attempts: int
    last_status: int | None
    last_error: str | None
    delivered_at: float | None


# -- signatures -----------------------------------------------------------------------------
def sign(secret: str | bytes, body: bytes) -> str:
    """Hex HMAC-SHA256 of the exact body bytes."""
    key = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def signature_header(secret: str | bytes, body: bytes) -> str:
    """The `X-Ferry-Signature` value: `sha256=<hex>`."""
    return f"sha256={sign(secret, body)}"


def verify_signature(secret: str | bytes, body: bytes, header: str) -> bool:
    """What a receiver does: timing-safe comparison of `X-Ferry-Signature`."""
    return hmac.compare_digest(signature_header(secret, body).encode(), header.encode())


def webhook_body(job: BatchJob) -> bytes:
    """The POSTed bytes: canonical JSON, so a retry sends (and signs) identical bytes."""
    payload = {"id": job.id, "object": "batch", "status": job.status.value,
               "counts": job.counts, "total": job.total, "completed_at": job.completed_at}
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


# -- validation -----------------------------------------------------------------------------
def _validate_items(items: object) -> list[tuple[str | None, str]]:
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)) or not items:
        raise InvalidInput("items must be a non-empty list of request objects", param="items")
    if len(items) > _MAX_ITEMS:
        raise InvalidInput(f"a batch holds at most {_MAX_ITEMS} items", param="items")
    out, seen = [], set()
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise InvalidInput(f"items[{i}] must be an object", param=f"items[{i}]")
        custom_id = item.get("custom_id")
        if custom_id is not None:
            if not isinstance(custom_id, str) or custom_id in seen:
                raise InvalidInput(f"items[{i}].custom_id must be a unique string",
                                   param=f"items[{i}].custom_id")
            seen.add(custom_id)
        try:
            out.append((custom_id, json.dumps(item)))
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"items[{i}] is not JSON-serialisable",
                               param=f"items[{i}]") from exc
    return out


def _validate_webhook(url: str | None, secret: str | None) -> None:
    if url is None:
        if secret is not None:
            raise InvalidInput("webhook_secret needs a webhook_url", param="webhook_secret")
        return
    scheme = host = None
    try:
        if isinstance(url, str):
            parts = urlsplit(url)
            scheme, host = parts.scheme, parts.hostname
    except ValueError:          # "http://[::1": urlsplit and .hostname raise on bad brackets
        pass
    if scheme not in ("http", "https") or not host:
        raise InvalidInput("webhook_url must be an http(s) URL", param="webhook_url")
    if secret is not None and (not isinstance(secret, str) or not 1 <= len(secret) <= 256):
        raise InvalidInput("webhook_secret must be 1-256 characters", param="webhook_secret")


def _not_found(job_id: str) -> FerryError:
    return FerryError(f"no batch job {job_id!r}", code="batch_not_found", status=404)


def _load(text: str | None) -> object | None:
    return None if text is None else json.loads(text)


def _item(row: sqlite3.Row) -> BatchItem:
    return BatchItem(row["job_id"], row["idx"], row["custom_id"], json.loads(row["request"]),
                     ItemStatus(row["status"]), _load(row["result"]), _load(row["error"]),
                     row["attempts"])


def _delivery(row: sqlite3.Row) -> WebhookDelivery:
    return WebhookDelivery(row["job_id"], row["url"], row["attempts"], row["last_status"],
                           row["last_error"], row["delivered_at"])


class BatchStore:
    """Batch jobs in the state database."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock

    async def create(self, route: str, items: Sequence[dict], *, model: str | None = None,
                     webhook_url: str | None = None, webhook_secret: str | None = None,
                     metadata: dict | None = None) -> BatchJob:
        rows = _validate_items(items)
        _validate_webhook(webhook_url, webhook_secret)
        if metadata is not None and not isinstance(metadata, dict):
            raise InvalidInput("metadata must be an object", param="metadata")
        job_id, now = f"batch_{secrets.token_hex(12)}", self._clock()
        async with self._db.transaction() as conn:
            await conn.execute(
                "INSERT INTO batch_jobs (id, route, model, status, total, webhook_url, "
                "webhook_secret, metadata, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, route, model, JobStatus.PENDING.value, len(rows), webhook_url,
                 webhook_secret, json.dumps(metadata) if metadata is not None else None,
                 now, now))
            await conn.executemany(
                "INSERT INTO batch_items (job_id, idx, custom_id, request, status) "
                "VALUES (?, ?, ?, ?, 'pending')",
                [(job_id, i, cid, body) for i, (cid, body) in enumerate(rows)])
        log.info("batch %s created: %d items for %s", job_id, len(rows), route)
        return await self.get(job_id)

    async def get(self, job_id: str) -> BatchJob:
        row = await self._db.fetchone("SELECT * FROM batch_jobs WHERE id = ?", (job_id,))
        if row is None:
            raise _not_found(job_id)
        return await self._job(row)

    async def _job(self, row: sqlite3.Row) -> BatchJob:
        counts = {s.value: 0 for s in ItemStatus}
        for r in await self._db.fetchall(
                "SELECT status, COUNT(*) AS n FROM batch_items WHERE job_id = ? GROUP BY status",
                (row["id"],)):
            counts[r["status"]] = r["n"]
        return BatchJob(row["id"], row["route"], row["model"], JobStatus(row["status"]),
                        row["total"], counts, row["webhook_url"],
                        json.loads(row["metadata"]) if row["metadata"] is not None else None,
                        row["created_at"], row["updated_at"], row["completed_at"])

    async def items(self, job_id: str, *, status: ItemStatus | str | None = None,
                    after: int = -1, limit: int = 1000) -> list[BatchItem]:
        """Items in index order, starting after index `after`."""
        sql, params = "SELECT * FROM batch_items WHERE job_id = ? AND idx > ?", [job_id, after]
        if status is not None:
            sql += " AND status = ?"
            params.append(ItemStatus(status).value)
        rows = await self._db.fetchall(sql + " ORDER BY idx LIMIT ?", (*params, limit))
        return [_item(r) for r in rows]

    async def cancel(self, job_id: str) -> BatchJob:
        """Cancel pending items; running ones finish and are recorded. Idempotent."""
        now = self._clock()
        async with self._db.transaction() as conn:
            rows = list(await conn.execute_fetchall(
                "SELECT status FROM batch_jobs WHERE id = ?", (job_id,)))
            if not rows:
                raise _not_found(job_id)
            if rows[0]["status"] == JobStatus.COMPLETED.value:
                raise FerryError(f"batch {job_id} already completed", code="batch_finished",
                                 status=409)
            if rows[0]["status"] in _OPEN_JOB:
                await conn.execute(
                    "UPDATE batch_items SET status = 'cancelled', finished_at = ? "
                    "WHERE job_id = ? AND status = 'pending'", (now, job_id))
                await self._finish(conn, job_id, JobStatus.CANCELLED, now)
        log.info("batch %s cancelled", job_id)
        return await self.get(job_id)

    async def claim_items(self, job_id: str, n: int) -> list[BatchItem]:
        """Move up to n pending items of an open job to running and return them."""
        now = self._clock()
        async with self._db.transaction() as conn:
            cur = await conn.execute(
                "UPDATE batch_items SET status = 'running', attempts = attempts + 1, "
                "started_at = ? WHERE job_id = ? AND idx IN (SELECT i.idx FROM batch_items i "
                "JOIN batch_jobs j ON j.id = i.job_id WHERE i.job_id = ? AND "
                "i.status = 'pending' AND j.status IN ('pending', 'running') "
                "ORDER BY i.idx LIMIT ?) RETURNING *", (now, job_id, job_id, n))
            rows = list(await cur.fetchall())
            if rows:
                await conn.execute(
                    "UPDATE batch_jobs SET status = 'running', updated_at = ? "
                    "WHERE id = ? AND status = 'pending'", (now, job_id))
        return sorted((_item(r) for r in rows), key=lambda it: it.idx)

    async def complete_item(self, job_id: str, idx: int, *, result: object | None = None,
                            error: object | None = None) -> BatchJob:
        """Record an item's result (or error); the job completes with its last item."""
        now = self._clock()
        status = ItemStatus.FAILED if error is not None else ItemStatus.DONE
        async with self._db.transaction() as conn:
            cur = await conn.execute(
                "UPDATE batch_items SET status = ?, result = ?, error = ?, finished_at = ? "
                "WHERE job_id = ? AND idx = ?",
                (status.value, json.dumps(result) if result is not None else None,
                 json.dumps(error) if error is not None else None, now, job_id, idx))
            if cur.rowcount == 0:
                raise FerryError(f"batch {job_id} has no item {idx}", code="batch_not_found",
                                 status=404)
            left = list(await conn.execute_fetchall(
                "SELECT COUNT(*) FROM batch_items WHERE job_id = ? AND "
                "status IN ('pending', 'running')", (job_id,)))[0][0]
            if left == 0:
                await self._finish(conn, job_id, JobStatus.COMPLETED, now)
        return await self.get(job_id)

    async def _finish(self, conn: aiosqlite.Connection, job_id: str, status: JobStatus,
                      now: float) -> None:
        """Terminal state and, if the job has a webhook, its delivery row: one transaction."""
        await conn.execute(
            "UPDATE batch_jobs SET status = ?, updated_at = ?, completed_at = ? "
            "WHERE id = ? AND status IN ('pending', 'running')", (status.value, now, now, job_id))
        await conn.execute(
            "INSERT OR IGNORE INTO webhook_deliveries (job_id, url) "
            "SELECT id, webhook_url FROM batch_jobs WHERE id = ? AND webhook_url IS NOT NULL",
            (job_id,))

    async def claim_unfinished(self) -> list[str]:
        """After a restart: running items go back to pending; returns open job ids, oldest
        first. Call once, before the runner starts claiming."""
        async with self._db.transaction() as conn:
            cur = await conn.execute(
                "UPDATE batch_items SET status = 'pending', started_at = NULL "
                "WHERE status = 'running'")
            requeued = cur.rowcount
            rows = list(await conn.execute_fetchall(
                "SELECT id FROM batch_jobs WHERE status IN ('pending', 'running') "
                "ORDER BY created_at, rowid"))
        if requeued:
            log.info("batches: %d interrupted items back to pending", requeued)
        return [r["id"] for r in rows]

    async def pending_webhooks(self) -> list[WebhookDelivery]:
        """Undelivered webhooks whose lease or back-off has ended."""
        rows = await self._db.fetchall(
            "SELECT * FROM webhook_deliveries WHERE delivered_at IS NULL AND attempts < ? AND "
            "(claimed_until IS NULL OR claimed_until < ?) ORDER BY rowid",
            (_MAX_ATTEMPTS, self._clock()))
        return [_delivery(r) for r in rows]

    async def claim_webhook(self, job_id: str, *, lease_s: float = 60.0
                            ) -> tuple[WebhookDelivery, str | None] | None:
        """(delivery, secret) if this caller may send the job's webhook now, else None."""
        now = self._clock()
        async with self._db.transaction() as conn:
            cur = await conn.execute(
                "UPDATE webhook_deliveries SET claimed_until = ?, attempts = attempts + 1, "
                "last_attempt_at = ? WHERE job_id = ? AND delivered_at IS NULL AND "
                "attempts < ? AND (claimed_until IS NULL OR claimed_until < ?) RETURNING *",
                (now + lease_s, now, job_id, _MAX_ATTEMPTS, now))
            rows = list(await cur.fetchall())
            if not rows:
                return None
            secret = list(await conn.execute_fetchall(
                "SELECT webhook_secret FROM batch_jobs WHERE id = ?", (job_id,)))[0][0]
        return _delivery(rows[0]), secret

    async def record_webhook_attempt(self, job_id: str, *, delivered: bool,
                                     status: int | None = None,
                                     error: str | None = None) -> WebhookDelivery:
        """After a POST: delivered stops all further sends; a failure backs off 2^attempts s."""
        now = self._clock()
        async with self._db.transaction() as conn:
            cur = await conn.execute(
                "UPDATE webhook_deliveries SET last_status = ?, last_error = ?, "
                "delivered_at = CASE WHEN ? THEN ? ELSE NULL END, "
                "claimed_until = CASE WHEN ? THEN NULL ELSE ? + min(3600, 1 << attempts) END "
                "WHERE job_id = ? AND delivered_at IS NULL RETURNING *",
                (status, error, delivered, now, delivered, now, job_id))
            rows = list(await cur.fetchall())
        if not rows:
            row = await self._db.fetchone("SELECT * FROM webhook_deliveries WHERE job_id = ?",
                                          (job_id,))
            if row is None:
                raise FerryError(f"batch {job_id} has no webhook", code="batch_not_found",
                                 status=404)
            return _delivery(row)
        delivery = _delivery(rows[0])
        if not delivered and delivery.attempts >= _MAX_ATTEMPTS:
            log.warning("batch %s: webhook abandoned after %d attempts", job_id,
                        delivery.attempts)
        return delivery

    # Last in the class: below this line the name `list` would mean the method.
    async def list(self, *, status: JobStatus | str | None = None, limit: int = 100,
                   cursor: str | None = None) -> tuple[list[BatchJob], str | None]:
        """Newest first; returns (jobs, next_cursor)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise InvalidInput("limit must be 1-1000", param="limit")
        where: list[str] = []
        params: list[object] = []
        if status is not None:
            where.append("status = ?")
            params.append(JobStatus(status).value)
        if cursor is not None:
            # ASCII ("²".isdigit()) and within SQLite's 64-bit integers
            if not (cursor.isascii() and cursor.isdigit()) or len(cursor) > 18:
                raise InvalidInput("cursor is malformed", param="cursor")
            where.append("rowid < ?")
            params.append(int(cursor))
        sql = "SELECT rowid AS pos, * FROM batch_jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = await self._db.fetchall(sql + " ORDER BY rowid DESC LIMIT ?", (*params, limit + 1))
        jobs = [await self._job(r) for r in rows[:limit]]
        return jobs, (str(rows[limit - 1]["pos"]) if len(rows) > limit else None)
