"""Own the SQLite file: apply the schema, serialise writes through one writer, read on a second connection."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

T = TypeVar("T")
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 10_000


def _schema_sql() -> str:
    return resources.files("llm_proxy").joinpath("schema.sql").read_text(encoding="utf-8")


async def _connect(path: Path) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path, isolation_level=None)
    conn.row_factory = sqlite3.Row
    await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    await conn.execute("PRAGMA foreign_keys = ON")
    await conn.execute("PRAGMA synchronous = NORMAL")
    return conn


class Database:
    """One writer connection (every write under BEGIN IMMEDIATE, one at a time) and one reader (WAL)."""

    def __init__(self, path: Path, writer: aiosqlite.Connection, reader: aiosqlite.Connection) -> None:
        self.path = path
        self._writer = writer
        self._reader = reader
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> Database:
        """Create the file and its directory if needed, switch to WAL and apply the schema."""
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = await _connect(path)
        try:
            await writer.execute("PRAGMA journal_mode = WAL")
            await writer.executescript(_schema_sql())
            await writer.execute(
                "INSERT OR IGNORE INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                (SCHEMA_VERSION, datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")),
            )
            reader = await _connect(path)
        except BaseException:
            await writer.close()
            raise
        return cls(path, writer, reader)

    async def close(self) -> None:
        """Close both connections (the writer last, so it checkpoints the WAL)."""
        await self._reader.close()
        async with self._lock:
            await self._writer.close()

    async def fetchone(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Row | None:
        """Run a read and return its first row."""
        async with self._reader.execute(sql, tuple(params)) as cursor:
            return await cursor.fetchone()

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        """Run a read and return every row."""
        async with self._reader.execute(sql, tuple(params)) as cursor:
            return list(await cursor.fetchall())

    async def write(self, work: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
        """Run `work` in one BEGIN IMMEDIATE transaction; nothing else writes meanwhile."""
        async with self._lock:
            await self._writer.execute("BEGIN IMMEDIATE")
            try:
                result = await work(self._writer)
            except BaseException:
                await self._writer.execute("ROLLBACK")
                raise
            await self._writer.execute("COMMIT")
            return result

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
        except (sqlite3.Error, ValueError, asyncio.TimeoutError):
            return False
        return True
