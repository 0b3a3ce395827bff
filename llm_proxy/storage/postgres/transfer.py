"""The two halves of a copy on PostgreSQL: a snapshot read as of one moment, and a load in one transaction."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from asyncpg import Connection

from llm_proxy.settings import database_url_passwords
from llm_proxy.storage.postgres.database import migrate, one_connection, translated

# The order rows were written in, which the copy keeps (ties in created_at are listed in it).
_ORDER = {"projects": "created_order", "tokens": "created_order", "usage_daily": "project_id, day",
          "audit_events": "id", "audit_chain": "instance"}
# The columns a copy carries: not those the database fills itself (created_order, an identity).
_COLUMNS = ("SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = current_schema()"
            " AND table_name = $1 AND is_identity = 'NO' AND is_generated = 'NEVER' ORDER BY ordinal_position")
# What another backend may give for a column of these types (SQLite's flags are 0 and 1).
_CONVERTERS: dict[str, Callable[[Any], Any]] = {"boolean": bool, "bigint": int, "integer": int}


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _columns(conn: Connection, table: str) -> list[tuple[str, str]]:
    return [(row[0], row[1]) for row in await conn.fetch(_COLUMNS, table)]


class PostgresSnapshot:
    """A database as of one moment, for a copy: every read in one REPEATABLE READ, READ ONLY transaction."""

    def __init__(self, conn: Connection, passwords: Sequence[str]) -> None:
        self._conn = conn
        self._passwords = passwords

    async def columns(self, table: str) -> list[str]:
        """The table's columns, in order, without those the database fills itself; none when there is no table."""
        with translated(self._passwords):
            return [name for name, _ in await _columns(self._conn, table)]

    async def rows(self, table: str, columns: Sequence[str], batch_size: int) -> AsyncIterator[list[tuple[Any, ...]]]:
        """The table's rows in the order they were written, `batch_size` at a time (a server-side cursor)."""
        sql = f"SELECT {', '.join(map(_quoted, columns))} FROM {_quoted(table)} ORDER BY {_ORDER[table]}"
        batch: list[tuple[Any, ...]] = []
        with translated(self._passwords):
            async for record in self._conn.cursor(sql, prefetch=batch_size):
                batch.append(tuple(record))
                if len(batch) == batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch


@contextlib.asynccontextmanager
async def snapshot(url: str) -> AsyncIterator[PostgresSnapshot]:
    """Read a database for a copy, as of one moment; nothing is created or migrated."""
    passwords = database_url_passwords(url)
    async with one_connection(url) as conn:
        with translated(passwords):
            transaction = conn.transaction(isolation="repeatable_read", readonly=True)
            await transaction.start()
        try:
            yield PostgresSnapshot(conn, passwords)
        finally:
            with contextlib.suppress(Exception):
                await transaction.rollback()


class PostgresLoad:
    """Rows written into a database for a copy, all in one transaction (see load())."""

    def __init__(self, conn: Connection, passwords: Sequence[str]) -> None:
        self._conn = conn
        self._passwords = passwords
        self._types: dict[str, list[tuple[str, str]]] = {}

    async def columns(self, table: str) -> list[str]:
        """The table's columns, in order, without those the database fills itself."""
        with translated(self._passwords):
            self._types[table] = await _columns(self._conn, table)
        return [name for name, _ in self._types[table]]

    async def count(self, table: str) -> int:
        """How many rows the table holds."""
        with translated(self._passwords):
            return int(await self._conn.fetchval(f"SELECT count(*) FROM {_quoted(table)}"))

    async def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Insert rows, their values in the order of `columns` (COPY: one round trip a batch)."""
        if table not in self._types:
            await self.columns(table)
        types = dict(self._types[table])
        converters = [_CONVERTERS.get(types[column]) for column in columns]
        records = [tuple(value if value is None or convert is None else convert(value)
                         for value, convert in zip(row, converters, strict=True)) for row in rows]
        with translated(self._passwords):
            await self._conn.copy_records_to_table(table, records=records, columns=list(columns))


@contextlib.asynccontextmanager
async def load(url: str) -> AsyncIterator[PostgresLoad]:
    """Write into the database in one transaction, the migrations not applied yet first: committed when
    the block ends, rolled back (leaving the database as it was) when it raises."""
    passwords = database_url_passwords(url)
    async with one_connection(url) as conn:
        with translated(passwords):
            transaction = conn.transaction()
            await transaction.start()
        try:
            with translated(passwords):
                # Inside the load's transaction (a savepoint): a load that fails or is refused leaves
                # the schema as it was too, and processes opening the database wait for the copy.
                await migrate(conn)
            yield PostgresLoad(conn, passwords)
        except BaseException:
            with contextlib.suppress(Exception):
                await transaction.rollback()
            raise
        with translated(passwords):
            await transaction.commit()
