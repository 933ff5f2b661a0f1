"""State database: creation, permissions, pragmas, migrations, refusal of bad directories."""
from __future__ import annotations

import asyncio
import functools
import multiprocessing as mp
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.errors import FerryError
from daemon.state import db as dbmod
from daemon.state import open_state, run_with_state
from daemon.state.schema import LATEST_VERSION, MIGRATIONS, statements

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[2]


def async_test(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))
    return wrapper


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA user_version").fetchone()[0]


@async_test
async def test_fresh_directory_is_created_private_and_migrated(tmp_path):
    state_dir = tmp_path / "a" / "state"
    state = await open_state(state_dir)
    try:
        assert mode(state_dir) == 0o700
        assert mode(state_dir / "ferry.db") == 0o600
        conn = state.db
        assert (await conn.fetchone("PRAGMA journal_mode"))[0] == "wal"
        assert (await conn.fetchone("PRAGMA foreign_keys"))[0] == 1
        assert (await conn.fetchone("PRAGMA busy_timeout"))[0] == 5000
        assert (await conn.fetchone("PRAGMA user_version"))[0] == LATEST_VERSION
        tables = {r[0] for r in await conn.fetchall(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"api_keys", "users", "request_log", "batch_jobs", "batch_items",
                "webhook_deliveries"} <= tables
        await state.keys.create("k")  # forces WAL and SHM files into existence
        for suffix in ("-wal", "-shm"):
            assert mode(Path(f"{state.path}{suffix}")) == 0o600
    finally:
        await state.close()


@async_test
async def test_wide_permissions_on_existing_file_are_tightened(tmp_path):
    (tmp_path / "ferry.db").touch(mode=0o644)
    os.chmod(tmp_path / "ferry.db", 0o644)
    state = await open_state(tmp_path)
    await state.close()
    assert mode(tmp_path / "ferry.db") == 0o600


@async_test
async def test_v1_database_migrates_to_latest_keeping_data(tmp_path):
    db = await dbmod.connect(tmp_path, target_version=1)
    from daemon.state.keys import KeyStore
    created = await KeyStore(db).create("old", scopes=["infer"])
    await db.close()
    assert user_version(tmp_path / "ferry.db") == 1

    state = await open_state(tmp_path)
    try:
        assert (await state.db.fetchone("PRAGMA user_version"))[0] == LATEST_VERSION
        assert (await state.keys.lookup(created.plaintext)).id == created.key.id
        job = await state.batches.create("/v1/chat/completions", [{"a": 1}])
        assert job.total == 1
    finally:
        await state.close()


@async_test
async def test_failed_migration_rolls_back_whole_version(tmp_path, monkeypatch):
    bad = [*MIGRATIONS[:1], (2, "CREATE TABLE half (x);\nCREATE TABLE broken (;\n")]
    monkeypatch.setattr(dbmod, "MIGRATIONS", bad)
    monkeypatch.setattr(dbmod, "LATEST_VERSION", 2)
    with pytest.raises(FerryError):
        await dbmod.connect(tmp_path)
    assert user_version(tmp_path / "ferry.db") == 1
    with sqlite3.connect(tmp_path / "ferry.db") as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert "half" not in names and "api_keys" in names


@async_test
async def test_newer_schema_is_refused_with_clear_error(tmp_path):
    state = await open_state(tmp_path)
    await state.close()
    with sqlite3.connect(tmp_path / "ferry.db") as conn:
        conn.execute("PRAGMA user_version = 999")
    with pytest.raises(FerryError) as err:
        await open_state(tmp_path)
    assert err.value.code == "state_schema_too_new"
    assert "999" in err.value.message and str(tmp_path) in err.value.message
    assert "newer Ferry" in err.value.message


@async_test
async def test_state_dir_under_a_file_is_unwritable(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FerryError) as err:
        await open_state(tmp_path / "file" / "state")
    assert err.value.code == "state_unwritable"
    assert str(tmp_path / "file") in err.value.message


@async_test
async def test_db_path_that_is_a_directory_is_unwritable(tmp_path):
    (tmp_path / "ferry.db").mkdir()
    with pytest.raises(FerryError) as err:
        await open_state(tmp_path)
    assert err.value.code == "state_unwritable"
    assert "ferry.db" in err.value.message


_UNWRITABLE_PROBE = """
import asyncio, sys
from pathlib import Path
from daemon.errors import FerryError
from daemon.state import open_state
try:
    asyncio.run(open_state(Path(sys.argv[1])))
except FerryError as e:
    print(e.code, e.message)
    sys.exit(0)
sys.exit(3)
"""


def test_read_only_directory_is_unwritable(tmp_path):
    """Root ignores directory modes, so as root the probe runs without capabilities."""
    ro = tmp_path / "state"
    ro.mkdir()
    os.chmod(ro, 0o555)
    cmd = [sys.executable, "-c", _UNWRITABLE_PROBE, str(ro)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and setpriv is unavailable to drop CAP_DAC_OVERRIDE")
        cmd = [setpriv, "--inh-caps=-all", "--bounding-set=-all", "--", *cmd]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=30)
    finally:
        os.chmod(ro, 0o755)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("state_unwritable") and str(ro) in proc.stdout


@async_test
async def test_reset_recreates_an_empty_database(tmp_path):
    state = await open_state(tmp_path)
    await state.keys.create("gone")
    await state.close()
    state = await open_state(tmp_path, reset=True)
    try:
        assert await state.keys.list() == []
        assert (await state.db.fetchone("PRAGMA user_version"))[0] == LATEST_VERSION
        assert mode(tmp_path / "ferry.db") == 0o600
    finally:
        await state.close()


def test_sync_wrapper_for_the_cli(tmp_path):
    async def create(state):
        return await state.keys.create("cli", scopes=["admin"])
    created = run_with_state(tmp_path, create)
    names = run_with_state(tmp_path, lambda s: _names(s))
    assert created.plaintext.startswith("fy_") and names == ["cli"]


async def _names(state):
    return [k.name for k in await state.keys.list()]


def _open_and_close(state_dir: str, start) -> int:
    start.wait(20)

    async def main():
        state = await open_state(Path(state_dir))
        version = (await state.db.fetchone("PRAGMA user_version"))[0]
        await state.close()
        return version
    return asyncio.run(main())


def test_two_processes_migrating_at_once_both_succeed(tmp_path):
    ctx = mp.get_context("spawn")
    start = ctx.Manager().Barrier(3)
    with ctx.Pool(3) as pool:
        results = [pool.apply_async(_open_and_close, (str(tmp_path), start)) for _ in range(3)]
        assert [r.get(timeout=40) for r in results] == [LATEST_VERSION] * 3


def test_statement_splitter_keeps_trigger_bodies_whole():
    script = ("CREATE TABLE t (x);\n-- note; not a statement\n"
              "CREATE TRIGGER tr AFTER INSERT ON t BEGIN\n  UPDATE t SET x = ';';\nEND;\n")
    parts = statements(script)
    assert len(parts) == 2 and parts[1].endswith("END;")


@async_test
async def test_a_cancelled_transaction_never_leaves_the_connection_inside_one(tmp_path):
    """Cancel a writer at every point of BEGIN … COMMIT (a shutdown does this): the next
    transaction must start cleanly, and each write is either whole or absent."""
    state = await open_state(tmp_path)
    db = state.db
    try:
        async with db.transaction() as conn:
            await conn.execute("CREATE TABLE t (x INTEGER)")

        async def write(x: int) -> None:
            async with db.transaction() as conn:
                await conn.execute("INSERT INTO t VALUES (?)", (x,))

        for yields in range(12):               # how far the writer gets before it is cancelled
            task = asyncio.create_task(write(yields))
            for _ in range(yields):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert not db.conn.in_transaction, yields
            await write(1000 + yields)           # raised "within a transaction" before the fix
        rows = {r[0] for r in await db.fetchall("SELECT x FROM t")}
        assert {1000 + y for y in range(12)} <= rows
    finally:
        await state.close()
