"""The two halves of a copy on SQLite: a snapshot read as of one moment, and a load in one transaction."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from llm_proxy.storage.sqlite.database import BUSY_TIMEOUT_MS, Database, read_only_uri, translated


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class SqliteSnapshot:
    """A database file as of one moment, for a copy: every read in one read transaction (WAL keeps its view)."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def columns(self, table: str) -> list[str]:
        """The table's columns, in order; none when there is no such table."""
        with translated():
            return [row[1] for row in await self._conn.execute_fetchall(f"PRAGMA table_info({_quoted(table)})")]

    async def rows(self, table: str, columns: Sequence[str], batch_size: int) -> AsyncIterator[list[tuple[Any, ...]]]:
        """The table's rows in the order they were written (rowid), `batch_size` at a time."""
        with translated():
            cursor = await self._conn.execute(
                f"SELECT {', '.join(map(_quoted, columns))} FROM {_quoted(table)} ORDER BY rowid")
        try:
            while True:
                with translated():
                    batch = await cursor.fetchmany(batch_size)
                if not batch:
                    return
                yield [tuple(row) for row in batch]
        finally:
            await cursor.close()


@contextlib.asynccontextmanager
async def snapshot(path: Path) -> AsyncIterator[SqliteSnapshot]:
    """Read an existing database file for a copy, read-only, as of one moment."""
    uri = read_only_uri(path)
    with translated():
        conn = await aiosqlite.connect(uri, uri=True, isolation_level=None)
    try:
        with translated():
            await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            await conn.execute("BEGIN")
        yield SqliteSnapshot(conn)
    finally:
        with translated():
            await conn.close()


class SqliteLoad:
    """Rows written into a database for a copy, all in one transaction (see load())."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def columns(self, table: str) -> list[str]:
        """The table's columns, in order."""
        return await SqliteSnapshot(self._conn).columns(table)

    async def count(self, table: str) -> int:
        """How many rows the table holds."""
        with translated():
            rows = list(await self._conn.execute_fetchall(f"SELECT count(*) FROM {_quoted(table)}"))
        return int(rows[0][0])

    async def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Insert rows, their values in the order of `columns`."""
        marks = ", ".join("?" * len(columns))
        with translated():
            await self._conn.executemany(
                f"INSERT INTO {_quoted(table)} ({', '.join(map(_quoted, columns))}) VALUES ({marks})", rows)


@contextlib.asynccontextmanager
async def load(path: Path) -> AsyncIterator[SqliteLoad]:
    """Create the database if needed, apply the schema, and write into it in one transaction: committed
    when the block ends, rolled back (leaving the database as it was) when it raises."""
    db = await Database.open(path)
    try:
        writer = db.writer
        with translated():
            await writer.execute("BEGIN IMMEDIATE")
        try:
            yield SqliteLoad(writer)
        except BaseException:
            with contextlib.suppress(sqlite3.Error, ValueError):
                await writer.execute("ROLLBACK")
            raise
        with translated():
            await writer.execute("COMMIT")
    finally:
        await db.close()
