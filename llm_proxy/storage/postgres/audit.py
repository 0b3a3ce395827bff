"""Audit events and the heads of their hash chains (one per instance) in PostgreSQL."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg
from asyncpg import Connection

from llm_proxy.settings import database_url_passwords
from llm_proxy.storage.base import ChainHead, ChainStep, PruneResult
from llm_proxy.storage.postgres.database import CONNECT_TIMEOUT, Database, rows_changed, translated
from llm_proxy.storage.rows import (
    COLUMNS,
    event_row,
    listed_event,
    newest,
    newest_per_chain,
    prune_anchors,
    walked_event,
)

_SELECT = f"SELECT {', '.join(COLUMNS)} FROM audit_events"
# A chain's recorded head, locked for the rest of the transaction: every writer of the chain, in every
# process, takes this row's lock first, so one at a time reads the head and moves it. Writers of
# different chains (instances) do not wait for each other.
_LOCK_HEAD = "SELECT seq, hash FROM audit_chain WHERE instance = $1 FOR UPDATE"
_ENSURE_HEAD = ("INSERT INTO audit_chain (instance, seq, hash) VALUES ($1, 0, repeat('0', 64))"
                " ON CONFLICT (instance) DO NOTHING")
# Rows may have been written past the recorded head: the head is the newer of the two.
_TOP_EVENT = "SELECT seq, hash FROM audit_events WHERE instance = $1 ORDER BY seq DESC LIMIT 1"
_HEADS = ("SELECT instance, seq, hash FROM audit_chain",
          "SELECT DISTINCT ON (instance) instance, seq, hash FROM audit_events ORDER BY instance, seq DESC")
_SET_HEAD = "UPDATE audit_chain SET seq = $2, hash = $3 WHERE instance = $1"
# One statement inserts a whole batch, one array per column: one round trip whatever its size.
_TYPES = {"seq": "bigint"}
_INSERT = (f"INSERT INTO audit_events ({', '.join(COLUMNS)}) SELECT * FROM unnest("
           + ", ".join(f"${number}::{_TYPES.get(column, 'text')}[]" for number, column in enumerate(COLUMNS, 1))
           + ")")


async def _insert(conn: Connection, events: Sequence[Mapping[str, Any]]) -> None:
    if events:
        await conn.execute(_INSERT, *(list(column) for column in zip(*map(event_row, events), strict=True)))


class PostgresAudit:
    """The AuditStore of storage.base, on one Database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def head(self, instance: str) -> ChainHead:
        async with self._db.connection() as conn:
            with self._db.translated():
                return newest([await conn.fetchrow("SELECT seq, hash FROM audit_chain WHERE instance = $1", instance),
                               await conn.fetchrow(_TOP_EVENT, instance)])

    async def heads(self) -> dict[str, ChainHead]:
        return newest_per_chain([tuple(row) for sql in _HEADS for row in await self._db.fetch(sql)])

    async def extend(self, instance: str, step: ChainStep) -> ChainHead | None:
        async def work(conn: Connection) -> ChainHead | None:
            recorded = await conn.fetchrow(_LOCK_HEAD, instance)
            if recorded is None:  # the chain's first writer: make its row, then lock it
                await conn.execute(_ENSURE_HEAD, instance)
                recorded = await conn.fetchrow(_LOCK_HEAD, instance)
            head = newest([recorded, await conn.fetchrow(_TOP_EVENT, instance)])

            async def insert(events: Sequence[Mapping[str, Any]]) -> None:
                # Translated here, not only when extend() returns: the step is caller code and should
                # see a DuplicateKey, never a driver's exception.
                with self._db.translated():
                    await _insert(conn, events)

            new = await step(head, insert)
            if new is not None:
                await conn.execute(_SET_HEAD, instance, *new)
            return new
        return await self._db.write(work)

    async def query(self, *, filters: Mapping[str, str], since: str | None, until: str | None,
                    before: int | None, limit: int) -> list[tuple[int, dict[str, Any]]]:
        where: list[str] = []
        params: list[Any] = []

        def condition(template: str, value: Any) -> None:
            params.append(value)
            where.append(template.format(f"${len(params)}"))

        for column in ("action", "project_id", "result"):
            if column in filters:
                condition(f"{column} = {{}}", filters[column])
        if since is not None:
            condition("timestamp >= {}", since)
        if until is not None:
            condition("timestamp < {}", until)
        if before is not None:
            condition("id < {}", before)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = await self._db.fetch(f"SELECT id, {', '.join(COLUMNS)} FROM audit_events{clause}"
                                    f" ORDER BY id DESC LIMIT ${len(params) + 1}", *params, limit)
        return [(row[0], listed_event(tuple(row)[1:])) for row in rows]

    async def walk(self, instance: str, after: int, limit: int) -> list[tuple[int, dict[str, Any] | None]]:
        rows = await self._db.fetch(f"{_SELECT} WHERE instance = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                                    instance, after, limit)
        return [walked_event(row) for row in rows]

    async def hourly_status(self, since: str) -> list[tuple[str, int | None, int]]:
        # The details are the JSON text the chain hashed, written compactly by orjson: the status is read
        # with a pattern, so a damaged row counts as "no status" instead of failing the whole query.
        rows = await self._db.fetch(
            "SELECT substr(timestamp, 1, 13), substring(details from '\"status\":([0-9]{3})[,}]')::int / 100,"
            " count(*) FROM audit_events WHERE action = 'token.access' AND timestamp >= $1 GROUP BY 1, 2"
            " ORDER BY 1, 2", since)
        return [(row[0], row[1], row[2]) for row in rows]

    async def prune_anchors(self) -> dict[str, ChainHead]:
        rows = await self._db.fetch("SELECT details FROM audit_events WHERE action = 'audit.prune' ORDER BY id DESC")
        return prune_anchors(row[0] for row in rows)

    async def prune(self, cutoff: str, batch_size: int) -> PruneResult:
        deleted = batches = 0
        pruned: dict[str, ChainHead] = {}
        for row in await self._db.fetch("SELECT DISTINCT instance FROM audit_events"):
            count, runs, last = await self._prune_chain(row[0], cutoff, batch_size)
            deleted, batches = deleted + count, batches + runs
            if last is not None:
                pruned[row[0]] = last
        return PruneResult(deleted, batches, pruned)

    async def _prune_chain(self, instance: str, cutoff: str, batch_size: int) -> tuple[int, int, ChainHead | None]:
        # Only a prefix of the chain is ever deleted: rows from the first one at or after the cutoff
        # onwards stay, even if a clock step gave a later row an older timestamp, so what remains is
        # one unbroken chain.
        row = await self._db.fetchrow("SELECT seq FROM audit_events WHERE instance = $1 AND timestamp >= $2"
                                      " ORDER BY seq LIMIT 1", instance, cutoff)
        if row is None:
            # Every row is old; rows written while we prune get higher seqs and are kept.
            top = await self._db.fetchrow("SELECT max(seq) FROM audit_events WHERE instance = $1", instance)
            boundary = (top[0] or 0) + 1 if top else 1
        else:
            boundary = row[0]

        async def delete_batch(conn: Connection) -> tuple[int, int, str] | None:
            last = await conn.fetchrow(
                "SELECT seq, hash FROM audit_events WHERE instance = $1 AND seq = (SELECT max(seq) FROM"
                " (SELECT seq FROM audit_events WHERE instance = $1 AND seq < $2 ORDER BY seq LIMIT $3) AS batch)",
                instance, boundary, batch_size)
            if last is None:
                return None
            deleted = rows_changed(await conn.execute("DELETE FROM audit_events WHERE instance = $1 AND seq <= $2",
                                                      instance, last[0]))
            return deleted, last[0], last[1]

        deleted = batches = 0
        last: ChainHead | None = None
        while (done := await self._db.write(delete_batch)) is not None:
            count, seq, digest = done
            deleted, batches, last = deleted + count, batches + 1, (seq, digest)
        return deleted, batches, last


_LEGACY_HEADS = ("SELECT '', seq, hash FROM audit_chain WHERE id = 1",
                 "SELECT '', seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")


async def peek_chain_heads(url: str) -> dict[str, ChainHead] | None:
    """Read every chain's head from the database at url, creating and migrating nothing; None if it holds
    no audit chain. Raises StorageError if it cannot be read."""
    passwords = database_url_passwords(url)
    with translated(passwords, connecting=True):
        conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT, server_settings={"application_name": "llm-proxy"})
    try:
        with translated(passwords):
            tables = [table for table in ("audit_chain", "audit_events")
                      if await conn.fetchval("SELECT to_regclass($1)", table) is not None]
            if not tables:
                return None
            migrated = await conn.fetchval(
                "SELECT count(*) FROM information_schema.columns WHERE table_schema = current_schema()"
                " AND table_name = 'audit_chain' AND column_name = 'instance'") or "audit_chain" not in tables
            queries = dict(zip(("audit_chain", "audit_events"), _HEADS if migrated else _LEGACY_HEADS, strict=True))
            return newest_per_chain([tuple(row) for table in tables for row in await conn.fetch(queries[table])])
    finally:
        with translated(passwords):
            await conn.close(timeout=CONNECT_TIMEOUT)
