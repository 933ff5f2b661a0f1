"""Client-defined metrics in the state database: one row per (name, label set).

Every HTTP worker writes and reads the same rows, so a value is the same whichever worker took
the POST and whichever answers the scrape. A counter's row accumulates the increments posted;
a gauge's row holds the last value set. The bounds (distinct names, series per name, labels
per series) are checked inside the write transaction, so two workers racing for the last slot
cannot both take it. Validation of names, labels and values is the frontend's
(frontends/http/custom_metrics.py).
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from daemon.errors import FerryError
from daemon.state.db import Database

__all__ = ["Series", "MetricBounds", "CustomMetricStore"]


@dataclass(slots=True, frozen=True)
class Series:
    name: str
    labels: dict[str, str]
    kind: str                 # "gauge" | "counter"
    help: str
    value: float

    def to_dict(self) -> dict:
        return {"name": self.name, "type": self.kind, "labels": self.labels,
                "value": self.value, "help": self.help}


@dataclass(slots=True, frozen=True)
class MetricBounds:
    max_metrics: int = 100
    max_series_per_metric: int = 100


def _limit(code: str, message: str) -> FerryError:
    return FerryError(message, code=code, status=429)


class CustomMetricStore:
    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock

    async def record(self, name: str, kind: str, labels: dict[str, str], value: float,
                     help_text: str, bounds: MetricBounds) -> Series:
        """Add `value` to a counter series or set a gauge series; the series after it.

        409 metric_type_conflict when `name` exists with the other type; 429
        metric_limit_exceeded / label_cardinality_exceeded past the bounds.
        """
        key = json.dumps(labels, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        async with self._db.transaction() as conn:
            rows = list(await conn.execute_fetchall(
                "SELECT kind, help, COUNT(*) FROM custom_metrics WHERE name = ? GROUP BY kind",
                (name,)))
            if rows and rows[0][0] != kind:
                raise FerryError(f"metric {name!r} is a {rows[0][0]}, not a {kind}",
                                 code="metric_type_conflict", status=409, param="type")
            existing = list(await conn.execute_fetchall(
                "SELECT value FROM custom_metrics WHERE name = ? AND labels = ?", (name, key)))
            if not rows:
                names = list(await conn.execute_fetchall(
                    "SELECT COUNT(DISTINCT name) FROM custom_metrics"))[0][0]
                if names >= bounds.max_metrics:
                    raise _limit("metric_limit_exceeded",
                                 f"{names} custom metrics exist, the most allowed "
                                 f"(custom_metrics.max_metrics = {bounds.max_metrics})")
            elif not existing and rows[0][2] >= bounds.max_series_per_metric:
                raise _limit("label_cardinality_exceeded",
                             f"metric {name!r} has {rows[0][2]} label combinations, the most "
                             "allowed (custom_metrics.max_series_per_metric = "
                             f"{bounds.max_series_per_metric})")
            help_text = rows[0][1] if rows else help_text
            new = value + float(existing[0][0]) if existing and kind == "counter" else value
            if not math.isfinite(new):
                raise FerryError(f"counter {name!r} would overflow", code="invalid_metric_value",
                                 status=400, param="value")
            await conn.execute(
                "INSERT INTO custom_metrics (name, labels, kind, help, value, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name, labels) DO UPDATE SET "
                "value = excluded.value, updated_at = excluded.updated_at",
                (name, key, kind, help_text, new, self._clock()))
        return Series(name, labels, kind, help_text, new)

    async def all(self) -> list[Series]:
        rows = await self._db.fetchall(
            "SELECT name, labels, kind, help, value FROM custom_metrics ORDER BY name, labels")
        return [Series(r["name"], json.loads(r["labels"]), r["kind"], r["help"],
                       float(r["value"])) for r in rows]

    async def delete(self, name: str) -> int:
        """Remove every series of `name`; how many (404 metric_not_found if none)."""
        async with self._db.transaction() as conn:
            cur = await conn.execute("DELETE FROM custom_metrics WHERE name = ?", (name,))
            removed = cur.rowcount
        if not removed:
            raise FerryError(f"there is no custom metric {name!r}", code="metric_not_found",
                             status=404)
        return removed
