"""Ferry's persistent state: one SQLite database (`<state_dir>/ferry.db`) and its stores.

    state = await open_state(state_dir)
    created = await state.keys.create("ci", scopes=["infer"], rpm=600)
    ...
    await state.close()

The CLI, which runs without the daemon, uses `run_with_state(state_dir, fn)`.
Rate limits are not in the database (see `daemon.state.ratelimit`).
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from daemon.state.batches import BatchStore
from daemon.state.changes import ChangeCounter
from daemon.state.db import Database, connect
from daemon.state.keys import KeyStore
from daemon.state.requestlog import RequestLog
from daemon.state.users import UserStore

__all__ = ["State", "open_state", "run_with_state", "CREDENTIALS_COUNTER"]

CREDENTIALS_COUNTER = "credentials.changes"     # beside ferry.db (daemon.state.changes)

T = TypeVar("T")


@dataclass(slots=True)
class State:
    """One process's handle on the state database."""

    path: Path
    db: Database
    keys: KeyStore
    users: UserStore
    requests: RequestLog
    batches: BatchStore

    async def close(self) -> None:
        """Flush the request log, then close the connection."""
        try:
            await self.requests.close()
        finally:
            if self.keys.changes is not None:
                self.keys.changes.close()
            await self.db.close()


async def open_state(state_dir: Path, *, reset: bool = False, store_bodies: bool = False,
                     log_max_age_s: float | None = None, log_max_rows: int | None = None,
                     busy_timeout_ms: int = 5000) -> State:
    """Open (creating and migrating as needed) the state database in state_dir.

    `reset=True` deletes the database first (development only). Raises FerryError
    `state_unwritable` or `state_schema_too_new`.
    """
    db = await connect(Path(state_dir), reset=reset, busy_timeout_ms=busy_timeout_ms)
    requests = RequestLog(db, store_bodies=store_bodies, max_age_s=log_max_age_s,
                          max_rows=log_max_rows)
    requests.start()
    changes = ChangeCounter(db.path.with_name(CREDENTIALS_COUNTER))
    return State(db.path, db, KeyStore(db, changes=changes), UserStore(db, changes=changes),
                 requests, BatchStore(db))


def run_with_state(state_dir: Path, fn: Callable[[State], Awaitable[T]], **kw: Any) -> T:
    """Open the state, run `await fn(state)`, close it: for synchronous callers like the CLI."""
    async def main() -> T:
        state = await open_state(state_dir, **kw)
        try:
            return await fn(state)
        finally:
            await state.close()
    return asyncio.run(main())
