"""Prompt templates in the state database: named, versioned Jinja sources.

Versions of a name are numbered from 1 and never change once written: a new text is a new
version, so a client that pins `version` always renders the same template. Every process reads
the table itself (no cache of rows), so a template created through one HTTP worker renders
through every other at once. Compiling and rendering are the frontend's part
(frontends/http/prompt_templates.py); this module stores and validates names only.
"""
from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from daemon.errors import FerryError, InvalidInput
from daemon.state.db import Database

__all__ = ["PromptTemplate", "TemplateSummary", "TemplateStore", "check_name", "NAME_RE"]

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_DESCRIPTION_MAX = 1024


@dataclass(slots=True, frozen=True)
class PromptTemplate:
    name: str
    version: int
    source: str
    description: str | None
    created_at: float

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "template": self.source,
                "description": self.description, "created_at": self.created_at}


@dataclass(slots=True, frozen=True)
class TemplateSummary:
    name: str
    latest_version: int
    versions: tuple[int, ...]
    created_at: float               # of version 1 still stored (the oldest)
    updated_at: float               # of the latest version

    def to_dict(self) -> dict:
        return {"name": self.name, "latest_version": self.latest_version,
                "versions": list(self.versions), "created_at": self.created_at,
                "updated_at": self.updated_at}


def check_name(name: object, param: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidInput("a template name is 1-128 characters: letters, digits, '_', '.', "
                           "'-', starting with a letter or digit", param=param)
    return name


def _description(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > _DESCRIPTION_MAX:
        raise InvalidInput(f"description must be a string of at most {_DESCRIPTION_MAX} "
                           "characters", param="description")
    return value


def not_found(name: str, version: int | None = None) -> FerryError:
    what = f"version {version} of prompt template {name!r}" if version is not None \
        else f"prompt template {name!r}"
    return FerryError(f"there is no {what}", code="template_not_found", status=404,
                      param="prompt_template")


def _row(row: sqlite3.Row) -> PromptTemplate:
    return PromptTemplate(row["name"], int(row["version"]), row["source"], row["description"],
                          float(row["created_at"]))


class TemplateStore:
    """Prompt templates of one state database."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock

    async def create(self, name: str, source: str,
                     description: str | None = None) -> PromptTemplate:
        """Version 1 of a new name; 409 `template_exists` when the name has versions."""
        name, description = check_name(name), _description(description)
        async with self._db.transaction() as conn:
            rows = list(await conn.execute_fetchall(
                "SELECT 1 FROM prompt_templates WHERE name = ? LIMIT 1", (name,)))
            if rows:
                raise FerryError(f"prompt template {name!r} exists; add a version with POST "
                                 f"/admin/prompt-templates/{name}/versions",
                                 code="template_exists", status=409, param="name")
            await conn.execute(
                "INSERT INTO prompt_templates (name, version, source, description, created_at) "
                "VALUES (?, 1, ?, ?, ?)", (name, source, description, self._clock()))
        return await self.get(name, 1)

    async def add_version(self, name: str, source: str,
                          description: str | None = None) -> PromptTemplate:
        """The next version of an existing name; 404 `template_not_found` otherwise."""
        name, description = check_name(name), _description(description)
        async with self._db.transaction() as conn:
            rows = list(await conn.execute_fetchall(
                "SELECT MAX(version) FROM prompt_templates WHERE name = ?", (name,)))
            latest = rows[0][0] if rows else None
            if latest is None:
                raise not_found(name)
            await conn.execute(
                "INSERT INTO prompt_templates (name, version, source, description, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (name, int(latest) + 1, source, description, self._clock()))
        return await self.get(name, int(latest) + 1)

    async def get(self, name: str, version: int | None = None) -> PromptTemplate:
        """One version (the latest when `version` is None); 404 `template_not_found`."""
        if version is None:
            row = await self._db.fetchone(
                "SELECT * FROM prompt_templates WHERE name = ? ORDER BY version DESC LIMIT 1",
                (name,))
        else:
            row = await self._db.fetchone(
                "SELECT * FROM prompt_templates WHERE name = ? AND version = ?",
                (name, int(version)))
        if row is None:
            raise not_found(name, version)
        return _row(row)

    async def versions(self, name: str) -> tuple[int, ...]:
        rows = await self._db.fetchall(
            "SELECT version FROM prompt_templates WHERE name = ? ORDER BY version", (name,))
        return tuple(int(r[0]) for r in rows)

    async def list(self) -> list[TemplateSummary]:
        rows = await self._db.fetchall(
            "SELECT name, version, created_at FROM prompt_templates ORDER BY name, version")
        out: dict[str, list[sqlite3.Row]] = {}
        for r in rows:
            out.setdefault(r["name"], []).append(r)
        return [TemplateSummary(name, int(rs[-1]["version"]),
                                tuple(int(r["version"]) for r in rs),
                                float(rs[0]["created_at"]), float(rs[-1]["created_at"]))
                for name, rs in out.items()]

    async def delete(self, name: str, version: int | None = None) -> int:
        """Remove one version, or every version of `name`; the number removed (404 if none).

        Deleting a version never renumbers the others; the next version after the latest is
        deleted reuses its number only when no higher version remains.
        """
        async with self._db.transaction() as conn:
            if version is None:
                cur = await conn.execute("DELETE FROM prompt_templates WHERE name = ?", (name,))
            else:
                cur = await conn.execute(
                    "DELETE FROM prompt_templates WHERE name = ? AND version = ?",
                    (name, int(version)))
            removed = cur.rowcount
        if not removed:
            raise not_found(name, version)
        return removed
