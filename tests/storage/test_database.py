"""The database layer: one writer, one reader, and reads that always see what was committed before them."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from contextlib import closing
from pathlib import Path

import pytest

from llm_proxy.storage.sqlite.database import Database
from tests.fakes import REPO


async def test_a_read_after_a_write_sees_it_while_other_reads_are_in_flight(tmp_path: Path) -> None:
    """A management handler writes, then reads the row back, while other requests read too. Were a
    read's cursor left open across an await, its snapshot (WAL) would be shared by the reads that
    start meanwhile, and the read-back could return the row as it was before the write: the bug
    that let a deactivation or key change be cached with the old values."""
    db = await Database.open(tmp_path / "llm-proxy.db")
    try:
        await db.execute("CREATE TABLE probe (id INTEGER PRIMARY KEY, value INTEGER NOT NULL)")
        await db.execute("INSERT INTO probe (id, value) VALUES (1, 0)")
        stop = asyncio.Event()

        async def keep_reading() -> int:
            reads = 0
            while not stop.is_set():
                await db.fetchone("SELECT value FROM probe WHERE id = 1")
                await db.fetchall("SELECT value FROM probe")
                reads += 1
            return reads

        readers = [asyncio.create_task(keep_reading()) for _ in range(4)]
        try:
            seen = []
            for value in range(1, 301):
                await db.execute("UPDATE probe SET value = ? WHERE id = 1", (value,))
                row = await db.fetchone("SELECT value FROM probe WHERE id = 1")
                assert row is not None
                seen.append(row[0])
        finally:
            stop.set()
            reads = await asyncio.gather(*readers)
        assert seen == list(range(1, 301))
        assert min(reads) > 0  # the other reads really were in flight meanwhile
    finally:
        await db.close()


async def test_fetchone_returns_none_or_the_first_row(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "llm-proxy.db")
    try:
        await db.execute("CREATE TABLE probe (id INTEGER PRIMARY KEY)")
        assert await db.fetchone("SELECT id FROM probe WHERE id = 1") is None
        await db.execute("INSERT INTO probe (id) VALUES (1), (2)")
        row = await db.fetchone("SELECT id FROM probe ORDER BY id LIMIT 1")
        assert row is not None and row["id"] == 1
        assert [row["id"] for row in await db.fetchall("SELECT id FROM probe ORDER BY id")] == [1, 2]
    finally:
        await db.close()


OPEN_AND_CLOSE = """
import asyncio, sys, time
from pathlib import Path
from llm_proxy.storage.sqlite.store import SqliteStore

database, ready, go = (Path(arg) for arg in sys.argv[1:4])
ready.touch()
deadline = time.monotonic() + 30
while not go.exists() and time.monotonic() < deadline:  # all start together, imports done
    time.sleep(0.0005)

async def main() -> None:
    store = SqliteStore(database)
    await store.open()
    await store.close()

asyncio.run(main())
"""


@pytest.mark.system
async def test_processes_opening_a_new_database_at_once_all_open_it(tmp_path: Path) -> None:
    """`serve --workers N` on a new file: each process switches it to WAL and applies the schema and
    migrations at the same moment. SQLite answers `database is locked` at once, without waiting, to
    a journal-mode switch or a write from a stale schema: neither may reach the operator."""
    for round_ in range(10):  # before the fix, about one round in four met the error
        path, go = tmp_path / f"new-{round_}.db", tmp_path / f"go-{round_}"
        ready = [tmp_path / f"ready-{round_}-{n}" for n in range(4)]
        processes = [await asyncio.create_subprocess_exec(
            sys.executable, "-c", OPEN_AND_CLOSE, str(path), str(flag), str(go),
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT) for flag in ready]
        for _ in range(600):  # bounded: 30 s
            if all(flag.exists() for flag in ready):
                break
            await asyncio.sleep(0.05)
        go.touch()
        outputs = [(await process.communicate())[0].decode() for process in processes]
        assert [process.returncode for process in processes] == [0] * 4, outputs
        with closing(sqlite3.connect(path)) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert [row[0] for row in conn.execute("SELECT version FROM schema_migrations")] == [1, 2, 3, 4]
