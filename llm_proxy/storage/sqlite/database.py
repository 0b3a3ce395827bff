"""Own the SQLite file: apply the schema, serialise writes through one writer, read on a second connection;
for the `db` commands, its recorded versions (the two halves of a copy are in transfer.py).

Every sqlite3 (and aiosqlite) exception is translated here, once, into storage.errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from llm_proxy.storage.errors import DuplicateKey, StorageBusy, StorageError, StorageUnavailable

T = TypeVar("T")
BUSY_TIMEOUT_MS = 10_000
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def _schema_sql() -> str:
    return resources.files(__package__).joinpath("schema.sql").read_text(encoding="utf-8")


def _migrations() -> list[tuple[int, str, str]]:
    """(version, name, SQL) of every migration after version 1 (migrations/NNNN_name.sql), in order."""
    found = []
    for entry in resources.files(__package__).joinpath("migrations").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort()
    assert [version for version, _, _ in found] == list(range(2, len(found) + 2)), "migrations are numbered 2, 3…"
    return found


# Version 1 is schema.sql, applied whole and idempotently at every open; the numbered migrations
# follow, each applied once with the record of it (_apply_schema).
_LATER = _migrations()
MIGRATIONS = ((1, "initial"), *((version, name) for version, name, _ in _LATER))
SCHEMA_VERSION = MIGRATIONS[-1][0]


def _statements(sql: str) -> list[str]:
    """A script's statements: separated by a semicolon at the end of a line, comment lines left out."""
    text = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return [statement.strip() for statement in re.split(r";\s*$", text, flags=re.MULTILINE) if statement.strip()]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _use_wal(writer: aiosqlite.Connection) -> None:
    """Switch the file to WAL (once: it stays so). The switch needs the file to itself and SQLite does not
    wait for that (no busy handler): while another process is opening it too, try again, for up to the
    busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor = await writer.execute("PRAGMA journal_mode = WAL")
            row = await cursor.fetchone()
            if row is not None and str(row[0]).lower() == "wal":
                return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
        if time.monotonic() > deadline:
            raise sqlite3.OperationalError("database is locked: could not switch it to WAL")
        await asyncio.sleep(0.02)


async def _apply_schema(writer: aiosqlite.Connection) -> None:
    """Bring the database to SCHEMA_VERSION: schema.sql (idempotent), then each migration not recorded yet.

    All in one BEGIN IMMEDIATE, which takes the write lock first (waiting up to the busy timeout):
    processes opening the database at once take turns, each migration runs once, and none of them
    reads the schema while another changes it (in WAL a statement that read a schema another
    connection has since changed cannot write, and fails at once instead of waiting).
    """
    await writer.execute("BEGIN IMMEDIATE")
    try:
        for statement in _statements(_schema_sql()):
            await writer.execute(statement)
        await writer.execute("INSERT OR IGNORE INTO schema_migrations (version, applied_at) VALUES (1, ?)", (_now(),))
        for version, _, sql in _LATER:
            cursor = await writer.execute("SELECT 1 FROM schema_migrations WHERE version = ?", (version,))
            if await cursor.fetchone() is None:
                for statement in _statements(sql):
                    await writer.execute(statement)
                await writer.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                                     (version, _now()))
        await writer.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error, ValueError):
            await writer.execute("ROLLBACK")
        raise


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
            await _use_wal(writer)
            await _apply_schema(writer)
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


# ---- for the `db` commands: versions ----

def read_only_uri(path: Path) -> str:
    """The URI that opens an existing database file read-only (nothing created, nothing migrated)."""
    if not path.is_file():
        raise StorageUnavailable(f"no database at {path}")
    return path.absolute().as_uri() + "?mode=ro"


def recorded_versions(path: Path) -> dict[int, str] | None:
    """The versions schema_migrations records, with when, read without changing anything; None when there
    is no database file or it has no schema_migrations table."""
    if not path.is_file():
        return None
    with translated(), contextlib.closing(sqlite3.connect(read_only_uri(path), uri=True,
                                                          timeout=BUSY_TIMEOUT_MS / 1000)) as conn:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'").fetchone():
            return {int(version): str(at) for version, at in conn.execute(
                "SELECT version, applied_at FROM schema_migrations")}
        return None


async def migrate(path: Path) -> list[tuple[int, str]]:
    """Create the database if needed and bring it to SCHEMA_VERSION; return the (version, name)s this applied."""
    before = recorded_versions(path) or {}
    if before and max(before) > SCHEMA_VERSION:
        raise StorageError(f"the database's schema is at version {max(before)}, newer than this llm-proxy "
                           f"knows ({SCHEMA_VERSION}): upgrade llm-proxy")
    db = await Database.open(path)
    await db.close()
    return [migration for migration in MIGRATIONS if migration[0] not in before]
