"""Audit events and the head of their hash chain in PostgreSQL."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg
from asyncpg import Connection

from llm_proxy.settings import database_url_passwords
from llm_proxy.storage.base import ChainHead, ChainStep, PruneResult
from llm_proxy.storage.postgres.database import CONNECT_TIMEOUT, Database, rows_changed, translated
from llm_proxy.storage.rows import COLUMNS, event_row, listed_event, newest, prune_anchor, walked_event

_SELECT = f"SELECT {', '.join(COLUMNS)} FROM audit_events"
# The recorded head, locked for the rest of the transaction: every writer of the chain, in every
# process, takes this row's lock first, so one at a time reads the head and moves it.
_LOCK_HEAD = "SELECT seq, hash FROM audit_chain WHERE id = 1 FOR UPDATE"
_ENSURE_HEAD = "INSERT INTO audit_chain (id, seq, hash) VALUES (1, 0, repeat('0', 64)) ON CONFLICT (id) DO NOTHING"
# Rows may have been written past the recorded head: the head is the newer of the two.
_TOP_EVENT = "SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1"
_SET_HEAD = "UPDATE audit_chain SET seq = $1, hash = $2 WHERE id = 1"
# One statement inserts a whole batch, one array per column: one round trip whatever its size.
_INSERT = ("INSERT INTO audit_events (seq, timestamp, action, actor, project_id, request_id, client_ip, result,"
           " details, hash) SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],"
           " $6::text[], $7::text[], $8::text[], $9::text[], $10::text[])")


async def _insert(conn: Connection, events: Sequence[Mapping[str, Any]]) -> None:
    if events:
        await conn.execute(_INSERT, *(list(column) for column in zip(*map(event_row, events), strict=True)))


class PostgresAudit:
    """The AuditStore of storage.base, on one Database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def head(self) -> ChainHead:
        async with self._db.connection() as conn:
            with self._db.translated():
                return newest([await conn.fetchrow("SELECT seq, hash FROM audit_chain WHERE id = 1"),
                               await conn.fetchrow(_TOP_EVENT)])

    async def extend(self, step: ChainStep) -> ChainHead | None:
        async def work(conn: Connection) -> ChainHead | None:
            recorded = await conn.fetchrow(_LOCK_HEAD)
            if recorded is None:  # the row the first migration made is gone: make it again, then lock it
                await conn.execute(_ENSURE_HEAD)
                recorded = await conn.fetchrow(_LOCK_HEAD)
            head = newest([recorded, await conn.fetchrow(_TOP_EVENT)])

            async def insert(events: Sequence[Mapping[str, Any]]) -> None:
                # Translated here, not only when extend() returns: the step is caller code and should
                # see a DuplicateKey, never a driver's exception.
                with self._db.translated():
                    await _insert(conn, events)

            new = await step(head, insert)
            if new is not None:
                await conn.execute(_SET_HEAD, *new)
            return new
        return await self._db.write(work)

    async def query(self, *, filters: Mapping[str, str], since: str | None, until: str | None,
                    before: int | None, limit: int) -> list[dict[str, Any]]:
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
            condition("seq < {}", before)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = await self._db.fetch(f"{_SELECT}{clause} ORDER BY seq DESC LIMIT ${len(params) + 1}", *params, limit)
        return [listed_event(row) for row in rows]

    async def walk(self, after: int, limit: int) -> list[tuple[int, dict[str, Any] | None]]:
        rows = await self._db.fetch(f"{_SELECT} WHERE seq > $1 ORDER BY seq LIMIT $2", after, limit)
        return [walked_event(row) for row in rows]

    async def prune_anchor(self) -> ChainHead | None:
        rows = await self._db.fetch("SELECT details FROM audit_events WHERE action = 'audit.prune' ORDER BY seq DESC")
        return prune_anchor(row[0] for row in rows)

    async def prune(self, cutoff: str, batch_size: int) -> PruneResult:
        # Only a prefix of the chain is ever deleted: rows from the first one at or after the cutoff
        # onwards stay, even if a clock step gave a later row an older timestamp, so what remains is
        # one unbroken chain.
        row = await self._db.fetchrow("SELECT seq FROM audit_events WHERE timestamp >= $1 ORDER BY seq LIMIT 1",
                                      cutoff)
        if row is None:
            # Every row is old; rows written while we prune get higher seqs and are kept.
            top = await self._db.fetchrow("SELECT max(seq) FROM audit_events")
            boundary = (top[0] or 0) + 1 if top else 1
        else:
            boundary = row[0]

        async def delete_batch(conn: Connection) -> tuple[int, int, str] | None:
            last = await conn.fetchrow(
                "SELECT seq, hash FROM audit_events WHERE seq ="
                " (SELECT max(seq) FROM (SELECT seq FROM audit_events WHERE seq < $1 ORDER BY seq LIMIT $2) AS batch)",
                boundary, batch_size)
            if last is None:
                return None
            deleted = rows_changed(await conn.execute("DELETE FROM audit_events WHERE seq <= $1", last[0]))
            return deleted, last[0], last[1]

        deleted = batches = 0
        last_seq: int | None = None
        last_hash: str | None = None
        while (done := await self._db.write(delete_batch)) is not None:
            count, last_seq, last_hash = done
            deleted += count
            batches += 1
        return PruneResult(deleted, batches, last_seq, last_hash)


async def peek_chain_head(url: str) -> ChainHead | None:
    """Read the chain head from the database at url, creating and migrating nothing; None if it holds no
    audit chain. Raises StorageError if it cannot be read."""
    passwords = database_url_passwords(url)
    with translated(passwords, connecting=True):
        conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT, server_settings={"application_name": "llm-proxy"})
    try:
        with translated(passwords):
            rows = []
            for table, sql in (("audit_chain", "SELECT seq, hash FROM audit_chain WHERE id = 1"),
                               ("audit_events", _TOP_EVENT)):
                if await conn.fetchval("SELECT to_regclass($1)", table) is not None:
                    rows.append(await conn.fetchrow(sql))
            return newest(rows) if rows else None
    finally:
        with translated(passwords):
            await conn.close(timeout=CONNECT_TIMEOUT)
