"""The database layer: one writer, one reader, and reads that always see what was committed before them."""

from __future__ import annotations

import asyncio
from pathlib import Path

from llm_proxy.storage.sqlite.database import Database


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
