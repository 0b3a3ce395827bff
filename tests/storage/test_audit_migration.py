"""A database whose audit trail predates instances (one chain, `seq` its key) is migrated to one chain per
instance, on both backends: its events keep their chain (that of no instance) and still verify, and a
gateway's new events start the chain of its own instance beside it."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
import pytest

from llm_proxy.audit.chain import ZERO_HASH, chain_hash
from llm_proxy.audit.verify import verify_table
from llm_proxy.audit.writer import AuditWriter
from llm_proxy.storage.base import Store
from llm_proxy.storage.sqlite.store import SqliteStore

OLD_COLUMNS = ("seq", "timestamp", "action", "actor", "project_id", "request_id", "client_ip", "result", "details",
               "hash")


def legacy_events(count: int) -> list[dict[str, Any]]:
    """Events as a gateway wrote them before instances: no `instance`, one chain from 64 zeros."""
    events, prev = [], ZERO_HASH
    for seq in range(1, count + 1):
        event: dict[str, Any] = {"timestamp": f"2024-01-0{seq}T00:00:00Z", "action": "token.access",
                                 "actor": "client", "result": "success", "details": {"n": seq}, "seq": seq}
        prev = event["hash"] = chain_hash(prev, event)
        events.append(event)
    return events


def legacy_rows(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [tuple(orjson.dumps(event[key]).decode() if key == "details" else event.get(key) for key in OLD_COLUMNS)
            for event in events]


def version_one_sqlite(path: Path, events: list[dict[str, Any]]) -> None:
    """A database as version 1 left it: schema.sql alone, its one chain head row."""
    schema = resources.files("llm_proxy.storage.sqlite").joinpath("schema.sql").read_text(encoding="utf-8")
    with closing(sqlite3.connect(path)) as conn:
        conn.executescript(schema)
        conn.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (1, '2024-01-01T00:00:00Z')")
        conn.executemany(f"INSERT INTO audit_events ({', '.join(OLD_COLUMNS)}) VALUES ({', '.join('?' * 10)})",
                         legacy_rows(events))
        conn.execute("INSERT INTO audit_chain (id, seq, hash) VALUES (1, ?, ?)",
                     (events[-1]["seq"], events[-1]["hash"]))
        conn.commit()


async def version_two_postgres(url: str, events: list[dict[str, Any]]) -> None:
    """A database as migrations 1 and 2 left it, with a chain written then."""
    import asyncpg

    from llm_proxy.storage.postgres.database import migrations

    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
        for migration in migrations()[:2]:
            await conn.execute(migration.sql)
            await conn.execute("INSERT INTO schema_migrations VALUES ($1, '2024-01-01T00:00:00Z')", migration.version)
        await conn.executemany(f"INSERT INTO audit_events ({', '.join(OLD_COLUMNS)}) VALUES"
                               f" ({', '.join(f'${n}' for n in range(1, 11))})", legacy_rows(events))
        await conn.execute("UPDATE audit_chain SET seq = $1, hash = $2", events[-1]["seq"], events[-1]["hash"])
    finally:
        await conn.close()


async def test_sqlite_version_one_is_migrated(tmp_path: Path) -> None:
    old = legacy_events(4)
    version_one_sqlite(tmp_path / "old.db", old)
    store = SqliteStore(tmp_path / "old.db")
    await store.open()
    await old_events_keep_their_chain_and_new_ones_start_the_instances(store, old)


async def test_postgresql_version_two_is_migrated(postgres_url: str) -> None:
    pytest.importorskip("asyncpg")  # the `postgres` extra (under CI a skip fails the run)
    from llm_proxy.storage.postgres.store import PostgresStore

    old = legacy_events(4)
    await version_two_postgres(postgres_url, old)
    store = PostgresStore(postgres_url)
    await store.open()
    await old_events_keep_their_chain_and_new_ones_start_the_instances(store, old)


async def old_events_keep_their_chain_and_new_ones_start_the_instances(store: Store,
                                                                        old: list[dict[str, Any]]) -> None:
    try:
        assert await store.audit.heads() == {"": (4, old[-1]["hash"])}
        assert await store.audit.walk("", 0, 10) == [(event["seq"], event) for event in old]
        assert (await verify_table(store.audit, heads=await store.audit.heads())).ok

        writer = AuditWriter(store.audit, enabled=True, file_path=None, create_dir=False, store_in_db=True,
                             mask_client_ip=False, instance="gw-1")
        await writer.start()
        writer.emit("token.create", actor="management", result="success")
        writer.emit("token.revoke", actor="management", result="success")
        await writer.close()

        heads = await store.audit.heads()
        assert set(heads) == {"", "gw-1"} and heads[""] == (4, old[-1]["hash"]) and heads["gw-1"][0] == 2
        result = await verify_table(store.audit, heads=heads)
        assert result.ok and {name: chain.events for name, chain in result.chains.items()} == {"": 4, "gw-1": 2}
        listed = await store.audit.query(filters={}, since=None, until=None, before=None, limit=10)
        assert [(event.get("instance"), event["seq"]) for _, event in listed] == [
            ("gw-1", 2), ("gw-1", 1), (None, 4), (None, 3), (None, 2), (None, 1)]
        # Positions continue after the old events' (their seq), so paging sees every event once.
        assert [position for position, _ in listed][2:] == [4, 3, 2, 1] and listed[1][0] > 4
    finally:
        await store.close()


async def test_sqlite_processes_opening_an_old_database_at_once_migrate_it_once(tmp_path: Path) -> None:
    """Each open checks and applies a migration in one BEGIN IMMEDIATE: the others wait, then find it done."""
    import asyncio

    old = legacy_events(3)
    path = tmp_path / "old.db"
    version_one_sqlite(path, old)
    stores = [SqliteStore(path) for _ in range(4)]
    await asyncio.gather(*(store.open() for store in stores))
    try:
        with closing(sqlite3.connect(path)) as conn:
            versions = [row[0] for row in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
            columns = [row[1] for row in conn.execute("PRAGMA table_info(audit_events)")]
        assert versions == [1, 2, 3, 4] and columns[:3] == ["id", "instance", "seq"]
        for store in stores:
            assert await store.audit.heads() == {"": (3, old[-1]["hash"])}
    finally:
        for store in stores:
            await store.close()
