"""Opening the state database: file permissions, pragmas, migrations, and write transactions.

One `Database` per process wraps one aiosqlite connection in autocommit mode
(`isolation_level=None`): every multi-statement write goes through `transaction()`, which
holds an asyncio lock so coroutines sharing the connection never interleave inside each
other's transaction. Several processes may open the same file; WAL lets readers run beside the
single writer and `busy_timeout` makes writers queue instead of failing at once.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import stat
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from daemon.errors import Busy, FerryError
from daemon.state.schema import LATEST_VERSION, MIGRATIONS, statements

__all__ = ["Database", "connect", "migrate", "schema_version", "ensure_state_dir", "DB_FILENAME"]

log = logging.getLogger(__name__)

# aiosqlite's DEBUG records print every statement with its parameters: webhook secrets and key
# hashes would reach the logs whenever an operator turns on DEBUG globally. Unless its level
# was set explicitly, keep it at INFO.
_aiosqlite_log = logging.getLogger("aiosqlite")
if _aiosqlite_log.level == logging.NOTSET:
    _aiosqlite_log.setLevel(logging.INFO)

DB_FILENAME = "ferry.db"
_FILE_MODE = 0o600
_DIR_MODE = 0o700


def _unwritable(path: Path, why: object) -> FerryError:
    return FerryError(f"state path {path} is not writable: {why}", code="state_unwritable",
                      status=500)


def _mapped(exc: sqlite3.Error, path: Path) -> FerryError:
    """Map a SQLite error to a stable Ferry error; the caller re-raises it `from exc`."""
    text = str(exc)
    if "locked" in text or "busy" in text:
        return Busy(f"state database {path} is busy: {text}", code="state_busy")
    if "readonly" in text or "unable to open" in text or "disk I/O" in text:
        return _unwritable(path, text)
    return FerryError(f"state database {path}: {text}", code="state_error", status=500)


class Database:
    """One process's connection to `ferry.db`."""

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path
        self._write_lock = asyncio.Lock()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """`BEGIN IMMEDIATE` … `COMMIT`; rolls back on any exception.

        IMMEDIATE takes the write lock up front, so a read-then-write inside cannot fail
        half-way with SQLITE_BUSY on lock upgrade.
        """
        async with self._write_lock:
            try:
                await _settled(self.conn, "BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise _mapped(exc, self.path) from exc
            try:
                yield self.conn
            except BaseException:
                await _rollback(self.conn)
                raise
            try:
                await _settled(self.conn, "COMMIT")
            except sqlite3.Error as exc:
                await _rollback(self.conn)
                raise _mapped(exc, self.path) from exc

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        try:
            return list(await self.conn.execute_fetchall(sql, tuple(params)))
        except sqlite3.Error as exc:
            raise _mapped(exc, self.path) from exc

    async def fetchone(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Row | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def close(self) -> None:
        await self.conn.close()


async def _settled(conn: aiosqlite.Connection, sql: str) -> None:
    """Run BEGIN or COMMIT so that a cancelled caller never leaves the connection inside a
    transaction: aiosqlite runs the statement on its thread whether or not we still await it,
    so on cancellation wait for it to finish, roll back what it left open, then re-raise."""
    statement = asyncio.ensure_future(conn.execute(sql))
    try:
        await asyncio.shield(statement)
    except asyncio.CancelledError:
        await asyncio.wait([statement])
        await _rollback(conn)
        raise


async def _rollback(conn: aiosqlite.Connection) -> None:
    """Roll back if a transaction is open: SQLite ends some on its own after an error (e.g. a
    full disk), and a failing ROLLBACK must not hide the error that caused it."""
    if conn.in_transaction:
        await conn.execute("ROLLBACK")


def ensure_state_dir(state_dir: Path) -> None:
    """Create the state directory 0700 if missing; FerryError `state_unwritable` if unusable."""
    try:
        if not state_dir.exists():
            state_dir.mkdir(mode=_DIR_MODE, parents=True)
            os.chmod(state_dir, _DIR_MODE)  # mkdir's mode is masked by the umask
        elif not state_dir.is_dir():
            raise NotADirectoryError(f"{state_dir} is not a directory")
    except OSError as exc:
        raise _unwritable(state_dir, exc.strerror or exc) from exc


def _remove_db_files(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        try:
            os.unlink(f"{path}{suffix}")
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _unwritable(path, exc.strerror or exc) from exc
    log.warning("state %s: reset requested; database removed and recreated", path)


def _create_file(path: Path) -> None:
    """Create the file ourselves so it is 0600 from its first byte (SQLite would use 0644).

    SQLite gives the -wal and -shm files the mode of the main file.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
            if mode & 0o077:
                log.warning("state %s: tightening permissions from %o to 600", path, mode)
                os.fchmod(fd, _FILE_MODE)
        finally:
            os.close(fd)
    except OSError as exc:
        raise _unwritable(path, exc.strerror or exc) from exc


async def schema_version(conn: aiosqlite.Connection) -> int:
    rows = await conn.execute_fetchall("PRAGMA user_version")
    return int(list(rows)[0][0])


def _too_new(path: Path, version: int) -> FerryError:
    return FerryError(
        f"state database {path} has schema version {version}, newer than this Ferry build "
        f"supports ({LATEST_VERSION}); it was written by a newer Ferry. Upgrade Ferry, or "
        f"point state_dir at another directory.", code="state_schema_too_new", status=500)


async def migrate(conn: aiosqlite.Connection, path: Path, *, target: int = LATEST_VERSION) -> int:
    """Apply pending migrations up to `target`, one transaction each; returns the version."""
    current = await schema_version(conn)
    if current > LATEST_VERSION:
        raise _too_new(path, current)
    for version, script in MIGRATIONS:
        if version <= current or version > target:
            continue
        await conn.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have migrated while we waited for the write lock.
            current = await schema_version(conn)
            if current >= version:
                await _rollback(conn)
                continue
            for sql in statements(script):
                await conn.execute(sql)
            await conn.execute(f"PRAGMA user_version = {int(version)}")
            await conn.execute("COMMIT")
        except BaseException:
            await _rollback(conn)
            raise
        current = version
        log.info("state %s: migrated to schema version %d", path, version)
    return current


async def connect(state_dir: Path, *, reset: bool = False, busy_timeout_ms: int = 5000,
                  target_version: int = LATEST_VERSION) -> Database:
    """Open (creating if needed) `<state_dir>/ferry.db`, migrated to `target_version`.

    Raises FerryError `state_unwritable` (the message names the path) or
    `state_schema_too_new`.
    """
    state_dir = Path(state_dir)
    path = state_dir / DB_FILENAME
    ensure_state_dir(state_dir)
    if reset:
        _remove_db_files(path)
    _create_file(path)
    try:
        conn = await aiosqlite.connect(str(path), isolation_level=None)
    except sqlite3.Error as exc:
        raise _mapped(exc, path) from exc
    conn.row_factory = sqlite3.Row
    try:
        await _configure(conn, path, busy_timeout_ms)
        await migrate(conn, path, target=target_version)
    except sqlite3.Error as exc:
        await conn.close()
        raise _mapped(exc, path) from exc
    except BaseException:
        await conn.close()
        raise
    return Database(conn, path)


async def _configure(conn: aiosqlite.Connection, path: Path, busy_timeout_ms: int) -> None:
    await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    mode = await _enable_wal(conn, busy_timeout_ms / 1000)
    if mode != "wal":
        # WAL is unavailable on some network filesystems; rollback journal still works.
        log.warning("state %s: WAL unavailable, journal mode is %s", path, mode)
    # FULL: a committed key or finished batch item survives power loss; writes on the hot
    # path are batched (request log) or not in SQLite at all (rate limits), so fsyncs are rare.
    await conn.execute("PRAGMA synchronous = FULL")
    await conn.execute("PRAGMA foreign_keys = ON")
    # Fail now, with the path, rather than on the first request that writes.
    await conn.execute("BEGIN IMMEDIATE")
    await conn.execute("ROLLBACK")


async def _enable_wal(conn: aiosqlite.Connection, timeout_s: float) -> str:
    """Switch to WAL, retrying: switching needs an exclusive lock and SQLite reports BUSY at
    once, without its busy handler, when another process opens the new file at the same time.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    delay = 0.005
    while True:
        try:
            rows = list(await conn.execute_fetchall("PRAGMA journal_mode = WAL"))
            return str(rows[0][0]).lower()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or loop.time() >= deadline:
                raise
        await asyncio.sleep(delay)  # back-off between retries, not synchronisation
        delay = min(delay * 2, 0.1)
