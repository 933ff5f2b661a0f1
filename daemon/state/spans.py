"""Recent trace spans in the state database: a ring of the newest `max_rows` spans.

Each HTTP worker buffers its finished spans in memory (bounded) and writes them in one
transaction per flush, off the request path, then trims the table to the newest `max_rows`;
every worker reads the same rows, so `GET /traces` answers for the whole daemon whichever
worker serves it.
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from daemon.state.db import Database

__all__ = ["SpanRecord", "SpanStore"]

_INSERT = ("INSERT INTO trace_spans (trace_id, span_id, parent_span_id, name, start, "
           "duration_ms, status, attributes) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")


@dataclass(slots=True)
class SpanRecord:
    trace_id: str                     # 32 lowercase hex
    span_id: str                      # 16 lowercase hex
    parent_span_id: str | None
    name: str
    start: float                      # Unix seconds
    duration_ms: float = 0.0
    status: str = "ok"
    attributes: dict[str, Any] = field(default_factory=dict)
    kind: str = "internal"            # server | client | internal (OTLP's SpanKind; not stored)

    def row(self) -> tuple[Any, ...]:
        return (self.trace_id, self.span_id, self.parent_span_id, self.name, self.start,
                self.duration_ms, self.status, json.dumps(self.attributes, default=str))


def _record(row: sqlite3.Row) -> SpanRecord:
    return SpanRecord(row["trace_id"], row["span_id"], row["parent_span_id"], row["name"],
                      float(row["start"]), float(row["duration_ms"]), row["status"],
                      json.loads(row["attributes"]))


class SpanStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def write(self, spans: list[SpanRecord], max_rows: int) -> None:
        """Append `spans`, then keep only the newest `max_rows` rows."""
        async with self._db.transaction() as conn:
            await conn.executemany(_INSERT, [s.row() for s in spans])
            await conn.execute("DELETE FROM trace_spans WHERE id <= "
                               "(SELECT MAX(id) FROM trace_spans) - ?", (max_rows,))

    async def recent(self, limit: int, trace_id: str | None = None) -> list[SpanRecord]:
        """The `limit` spans recorded last (only `trace_id`'s when given), latest start first
        (a request's spans are recorded as they end, so a parent after its children)."""
        if trace_id is None:
            rows = await self._db.fetchall(
                "SELECT * FROM trace_spans ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = await self._db.fetchall(
                "SELECT * FROM trace_spans WHERE trace_id = ? ORDER BY id DESC LIMIT ?",
                (trace_id, limit))
        return sorted((_record(r) for r in rows), key=lambda s: s.start, reverse=True)
