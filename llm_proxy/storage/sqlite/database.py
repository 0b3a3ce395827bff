"""Own the SQLite file: apply the schema, serialise writes through one writer, read on a second connection.

Every sqlite3 (and aiosqlite) exception is translated here, once, into storage.errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Iterator
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from llm_proxy.storage.errors import DuplicateKey, StorageBusy, StorageError, StorageUnavailable

T = TypeVar("T")
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 10_000


def _schema_sql() -> str:
    return resources.files(__package__).joinpath("schema.sql").read_text(encoding="utf-8")


# What aiosqlite raises when its connection is closed or gone.
_CLOSED = ("Connection closed", "no active connection")


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Translate what sqlite3 and aiosqlite raise into storage.errors; let everything else through."""
    try:
        yield
    except sqlite3.IntegrityError as exc:
        if "UNIQUE" in str(exc):
            raise DuplicateKey(str(exc)) from exc
        raise StorageError(str(exc)) from exc
    except sqlite3.OperationalError as exc:
        message = str(exc)
        if "locked" in message or "busy" in message:
            raise StorageBusy(message) from exc
        raise StorageUnavailable(message) from exc
    except sqlite3.Error as exc:
        raise StorageError(str(exc)) from exc
    except ValueError as exc:
        if exc.args and exc.args[0] in _CLOSED:
            raise StorageUnavailable("the database connection is closed") from exc
        raise


async def _connect(path: Path) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path, isolation_level=None)
    conn.row_factory = sqlite3.Row
    await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    await conn.execute("PRAGMA foreign_keys = ON")
    await conn.execute("PRAGMA synchronous = NORMAL")
    return conn


class Database:
    """One writer connection (every write under BEGIN IMMEDIATE, one at a time) and one reader (WAL)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Future[None]] = set()

    @classmethod
    async def open(cls, path: Path) -> Database:
        """Construct and connect in one step."""
        db = cls(path)
        await db.connect()
        return db

    async def connect(self) -> None:
        """Create the file and its directory if needed, switch to WAL and apply the schema."""
        with translated():
            await self._connect()

    async def _connect(self) -> None:
        if self._writer is not None:
            return  # already open: opening again is harmless and leaves no connection behind
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            # Encrypted keys and token digests are nobody else's business: owner-only from the start
            # (SQLite gives its -wal and -shm files the same mode).
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        writer = await _connect(self.path)
        try:
            await writer.execute("PRAGMA journal_mode = WAL")
            await writer.executescript(_schema_sql())
            await writer.execute(
                "INSERT OR IGNORE INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                (SCHEMA_VERSION, datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")),
            )
            self._reader = await _connect(self.path)
        except BaseException:
            await writer.close()
            raise
        self._writer = writer

    @property
    def writer(self) -> aiosqlite.Connection:
        if self._writer is None:
            raise StorageUnavailable("the database is not connected")
        return self._writer

    @property
    def reader(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise StorageUnavailable("the database is not connected")
        return self._reader

    async def close(self) -> None:
        """Close both connections (the writer last, so it checkpoints the WAL)."""
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        async with self._lock:
            if self._writer is not None:
                await self._writer.close()
                self._writer = None

    # Every read runs to its end in one call on the reader's thread. A cursor left open across an
    # await keeps the reader's snapshot (WAL): another read started meanwhile would then see the
    # database as it was before writes that committed since, such as the one it just waited for.

    async def fetchone(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Row | None:
        """Run a read expected to give at most one row (a key lookup, LIMIT 1) and return it."""
        with translated():
            rows = await self.reader.execute_fetchall(sql, tuple(params))
        return next(iter(rows), None)

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        """Run a read and return every row."""
        with translated():
            return list(await self.reader.execute_fetchall(sql, tuple(params)))

    async def write(self, work: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
        """Run `work` in one BEGIN IMMEDIATE transaction; nothing else writes meanwhile.

        What work raises itself passes through as it is; the driver's errors are translated.
        """
        with translated():
            return await self._write(work)

    async def _write(self, work: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
        writer = self.writer  # before the lock: not connected must not leave it held
        await self._lock.acquire()
        try:
            await writer.execute("BEGIN IMMEDIATE")
            result = await work(writer)
            await writer.execute("COMMIT")
        except BaseException as exc:
            # Cancelling an await does not stop a statement already queued on aiosqlite's thread (a
            # BEGIN waiting for another process's lock runs once the lock is free), so a ROLLBACK
            # must follow it, and no other write may start before. A cancelled caller does not
            # wait for that: the rollback finishes in the background and then frees the writer.
            rollback = asyncio.ensure_future(self._rollback_and_release(writer))
            if isinstance(exc, asyncio.CancelledError):
                self._background.add(rollback)
                rollback.add_done_callback(self._background.discard)
            else:
                await asyncio.shield(rollback)
            raise
        self._lock.release()
        return result

    async def _rollback_and_release(self, writer: aiosqlite.Connection) -> None:
        try:
            with contextlib.suppress(sqlite3.Error, ValueError):  # no transaction open, or closed
                await writer.execute("ROLLBACK")
        finally:
            self._lock.release()

    async def execute(self, sql: str, params: Iterable[Any] = ()) -> int:
        """Run one write statement in its own transaction and return the rows it changed."""
        async def work(conn: aiosqlite.Connection) -> int:
            cursor = await conn.execute(sql, tuple(params))
            return cursor.rowcount
        return await self.write(work)

    async def ping(self) -> bool:
        """Tell whether the database answers a trivial query."""
        try:
            await asyncio.wait_for(self.fetchone("SELECT 1"), timeout=2.0)
        except (TimeoutError, StorageError):
            return False
        return True
