"""Audit events and the head of their hash chain in SQLite."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from llm_proxy.storage.base import ChainHead, ChainStep, PruneResult
from llm_proxy.storage.rows import (
    COLUMNS,
    event_from_row,
    event_row,
    listed_event,
    newest,
    newest_per_chain,
    prune_anchors,
    walked_event,
)
from llm_proxy.storage.sqlite.database import Database, translated

# COLUMNS, INSERT_ROWS and event_from_row are also what the writer's tests read rows with.
__all__ = ["COLUMNS", "INSERT_ROWS", "SqliteAudit", "event_from_row", "peek_chain_heads"]

_SELECT = f"SELECT {', '.join(COLUMNS)} FROM audit_events"
# Where a chain's head is read from: both, in case rows were written past the recorded head (the
# recorded head is normally the newer of the two).
_HEAD_QUERIES = ("SELECT seq, hash FROM audit_chain WHERE instance = ?",
                 "SELECT seq, hash FROM audit_events WHERE instance = ? ORDER BY seq DESC LIMIT 1")
_HEADS_QUERIES = ("SELECT instance, seq, hash FROM audit_chain",
                  "SELECT instance, seq, hash FROM audit_events WHERE (instance, seq) IN"
                  " (SELECT instance, max(seq) FROM audit_events GROUP BY instance)")
_SET_HEAD = ("INSERT INTO audit_chain (instance, seq, hash) VALUES (?, ?, ?)"
             " ON CONFLICT (instance) DO UPDATE SET seq = excluded.seq, hash = excluded.hash")
# Events are inserted by multi-row INSERT statements (up to INSERT_ROWS rows each), not by
# executemany(): executemany() takes the GIL back after every row's insert, and under load each of
# those grabs preempts the event loop (bench/ablate.py: 49 µs of CPU per proxied request for the
# table). One statement binds its parameters at once and inserts all its rows with the GIL released.
# 90 rows × 11 columns stays within 999 parameters, the limit of SQLite builds older than 3.32.
INSERT_ROWS = 90
_INSERT_HEAD = f"INSERT INTO audit_events ({', '.join(COLUMNS)}) VALUES "
_ROW = "(" + ", ".join("?" * len(COLUMNS)) + ")"


async def _insert(conn: aiosqlite.Connection, events: Sequence[Mapping[str, Any]]) -> None:
    rows = [event_row(event) for event in events]
    for first in range(0, len(rows), INSERT_ROWS):
        chunk = rows[first:first + INSERT_ROWS]
        await conn.execute(_INSERT_HEAD + ", ".join([_ROW] * len(chunk)), [value for row in chunk for value in row])


class SqliteAudit:
    """The AuditStore of storage.base, on one Database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def head(self, instance: str) -> ChainHead:
        return newest([await self._db.fetchone(sql, (instance,)) for sql in _HEAD_QUERIES])

    async def heads(self) -> dict[str, ChainHead]:
        return newest_per_chain([row for sql in _HEADS_QUERIES for row in await self._db.fetchall(sql)])

    async def extend(self, instance: str, step: ChainStep) -> ChainHead | None:
        async def work(conn: aiosqlite.Connection) -> ChainHead | None:
            head = newest([await (await conn.execute(sql, (instance,))).fetchone() for sql in _HEAD_QUERIES])

            async def insert(events: Sequence[Mapping[str, Any]]) -> None:
                # Translated here, not only when extend() returns: the step is caller code and should
                # see a DuplicateKey, never a driver's exception.
                with translated():
                    await _insert(conn, events)

            new = await step(head, insert)
            if new is not None:
                await conn.execute(_SET_HEAD, (instance, *new))
            return new
        return await self._db.write(work)

    async def query(self, *, filters: Mapping[str, str], since: str | None, until: str | None,
                    before: int | None, limit: int) -> list[tuple[int, dict[str, Any]]]:
        where: list[str] = []
        params: list[Any] = []
        for column in ("action", "project_id", "result"):
            if column in filters:
                where.append(f"{column} = ?")
                params.append(filters[column])
        if since is not None:
            where.append("timestamp >= ?")
            params.append(since)
        if until is not None:
            where.append("timestamp < ?")
            params.append(until)
        if before is not None:
            where.append("id < ?")
            params.append(before)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = await self._db.fetchall(f"SELECT id, {', '.join(COLUMNS)} FROM audit_events{clause}"
                                       " ORDER BY id DESC LIMIT ?", (*params, limit))
        return [(row[0], listed_event(tuple(row)[1:])) for row in rows]

    async def walk(self, instance: str, after: int, limit: int) -> list[tuple[int, dict[str, Any] | None]]:
        rows = await self._db.fetchall(f"{_SELECT} WHERE instance = ? AND seq > ? ORDER BY seq LIMIT ?",
                                       (instance, after, limit))
        return [walked_event(row) for row in rows]

    async def hourly_status(self, since: str) -> list[tuple[str, int | None, int]]:
        rows = await self._db.fetchall(
            "SELECT substr(timestamp, 1, 13), CASE WHEN json_valid(details) THEN"
            " CAST(json_extract(details, '$.status') AS INTEGER) / 100 END, count(*) FROM audit_events"
            " WHERE action = 'token.access' AND timestamp >= ? GROUP BY 1, 2 ORDER BY 1, 2", (since,))
        return [(row[0], row[1], row[2]) for row in rows]

    async def prune_anchors(self) -> dict[str, ChainHead]:
        rows = await self._db.fetchall(
            "SELECT details FROM audit_events WHERE action = 'audit.prune' ORDER BY id DESC")
        return prune_anchors(row[0] for row in rows)

    async def prune(self, cutoff: str, batch_size: int) -> PruneResult:
        deleted = batches = 0
        pruned: dict[str, ChainHead] = {}
        for (instance,) in await self._db.fetchall("SELECT DISTINCT instance FROM audit_events"):
            count, runs, last = await self._prune_chain(instance, cutoff, batch_size)
            deleted, batches = deleted + count, batches + runs
            if last is not None:
                pruned[instance] = last
        return PruneResult(deleted, batches, pruned)

    async def _prune_chain(self, instance: str, cutoff: str, batch_size: int) -> tuple[int, int, ChainHead | None]:
        # Only a prefix of the chain is ever deleted: rows from the first one at or after the cutoff
        # onwards stay, even if a clock step gave a later row an older timestamp, so what remains is
        # one unbroken chain. "+timestamp" keeps SQLite on the (instance, seq) key: it reads only the rows to go.
        row = await self._db.fetchone("SELECT seq FROM audit_events WHERE instance = ? AND +timestamp >= ?"
                                      " ORDER BY seq LIMIT 1", (instance, cutoff))
        if row is None:
            # Every row is old; rows written while we prune get higher seqs and are kept.
            top = await self._db.fetchone("SELECT max(seq) FROM audit_events WHERE instance = ?", (instance,))
            boundary = (top[0] or 0) + 1 if top else 1
        else:
            boundary = row[0]

        async def delete_batch(conn: aiosqlite.Connection) -> tuple[int, int, str] | None:
            cursor = await conn.execute(
                "SELECT seq, hash FROM audit_events WHERE instance = ? AND seq = (SELECT max(seq) FROM"
                " (SELECT seq FROM audit_events WHERE instance = ? AND seq < ? ORDER BY seq LIMIT ?))",
                (instance, instance, boundary, batch_size))
            last = await cursor.fetchone()
            if last is None:
                return None
            cursor = await conn.execute("DELETE FROM audit_events WHERE instance = ? AND seq <= ?",
                                        (instance, last[0]))
            return cursor.rowcount, last[0], last[1]

        deleted = batches = 0
        last: ChainHead | None = None
        while (done := await self._db.write(delete_batch)) is not None:
            count, seq, digest = done
            deleted, batches, last = deleted + count, batches + 1, (seq, digest)
        return deleted, batches, last


# The same, in a database not migrated to version 2 yet: one chain, of no instance.
_LEGACY_HEADS_QUERIES = ("SELECT '', seq, hash FROM audit_chain WHERE id = 1",
                         "SELECT '', seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")


def peek_chain_heads(database: Path) -> dict[str, ChainHead] | None:
    """Read every chain's head from a database file, read-only (nothing created or migrated); None if it
    holds no audit chain. Raises StorageError if the file cannot be read as a database."""
    with translated():
        conn = sqlite3.connect(database.absolute().as_uri() + "?mode=ro", uri=True, timeout=10)
        try:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not tables & {"audit_chain", "audit_events"}:
                return None
            columns = {row[1] for row in conn.execute("PRAGMA table_info(audit_chain)")}
            queries = _HEADS_QUERIES if "instance" in columns or not columns else _LEGACY_HEADS_QUERIES
            rows = [row for sql, table in zip(queries, ("audit_chain", "audit_events"), strict=True)
                    if table in tables for row in conn.execute(sql).fetchall()]
            return newest_per_chain(rows)
        finally:
            conn.close()
