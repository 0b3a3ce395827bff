"""Own the PostgreSQL pool: apply the numbered migrations under a lock, run reads and transactions.

Every asyncpg exception (and a socket's, while connecting) is translated here, once, into
storage.errors; no message ever carries the password of the URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any, TypeVar

import asyncpg
from asyncpg import Connection, Record
from asyncpg.exceptions import _base as asyncpg_base

from llm_proxy.settings import database_url_passwords
from llm_proxy.storage.errors import DuplicateKey, StorageBusy, StorageError, StorageUnavailable

T = TypeVar("T")

# The key of the transaction-scoped advisory lock every process takes before looking at
# schema_migrations: N processes opening one database at once apply each migration once.
MIGRATION_LOCK = 0x6C6C6D2D70726F78  # "llm-prox"
CONNECT_TIMEOUT = 10.0
# How long a statement waits for a row lock before StorageBusy: SQLite's busy timeout.
LOCK_TIMEOUT_MS = 10_000
# Migrations may wait longer for the lock: another process may be applying a long one.
MIGRATION_LOCK_TIMEOUT_MS = 300_000
POOL_MAX_SIZE = 10
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """Every migration this version knows, in order (migrations/NNNN_name.sql)."""
    found = []
    for entry in resources.files(__package__).joinpath("migrations").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda migration: migration.version)
    assert [m.version for m in found] == list(range(1, len(found) + 1)), "migrations are numbered 1, 2, 3…"
    return found


# ---- exceptions ----

def _scrubbed(text: str, passwords: Sequence[str]) -> str:
    for password in passwords:
        text = text.replace(password, "***")
    return text


def _kind(exc: BaseException, connecting: bool) -> type[StorageError] | None:
    if isinstance(exc, asyncpg.UniqueViolationError):
        return DuplicateKey
    if isinstance(exc, asyncpg.DeadlockDetectedError | asyncpg.SerializationError | asyncpg.LockNotAvailableError):
        return StorageBusy
    if isinstance(exc, asyncpg.PostgresConnectionError | asyncpg.CannotConnectNowError
                  | asyncpg.TooManyConnectionsError | asyncpg.AdminShutdownError | asyncpg.CrashShutdownError):
        return StorageUnavailable
    if isinstance(exc, asyncpg.PostgresError | asyncpg_base.DataError | asyncpg_base.ClientConfigurationError):
        return StorageError
    # The connection or the pool is closed, or a connection the server ended met in mid-operation
    # ("cannot switch to state …; another operation is in progress"): the pool replaces it.
    if isinstance(exc, asyncpg.InterfaceError | asyncpg_base.InternalClientError):
        return StorageUnavailable
    if connecting and isinstance(exc, OSError):  # refused, unreachable, timed out, no such host
        return StorageUnavailable
    return None


@contextlib.contextmanager
def translated(passwords: Sequence[str] = (), *, connecting: bool = False) -> Iterator[None]:
    """Translate what asyncpg raises (and OSError too while `connecting`) into storage.errors.

    The message is the driver's own with each of `passwords` masked; an exception whose text held
    one is not chained (a traceback would print it). Everything else passes through.
    """
    try:
        yield
    except Exception as exc:
        kind = _kind(exc, connecting)
        if kind is None:
            raise
        text = str(exc) or type(exc).__name__
        message = _scrubbed(text, passwords)
        raise kind(message) from (exc if message == text else None)


async def _keep_session(conn: Connection) -> None:
    """Give a connection back to the pool as it is (asyncpg rolls back an open transaction first).

    Nothing here leaves session state (no LISTEN, SET, cursor or session-level lock), so the default
    reset, one more round trip on every release, would buy nothing.
    """


def rows_changed(status: str) -> int:
    """The rows a command changed, from its status ("UPDATE 3", "INSERT 0 1")."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


def now_text() -> str:
    """The current UTC time as stored (YYYY-MM-DDTHH:MM:SSZ)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def applied_versions(conn: Connection) -> dict[int, str] | None:
    """The versions recorded in schema_migrations, with when; None if the table does not exist."""
    if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
        return None
    return {row[0]: row[1] for row in await conn.fetch("SELECT version, applied_at FROM schema_migrations")}


async def migrate(conn: Connection) -> list[Migration]:
    """Apply the migrations not applied yet, each recorded in schema_migrations; return them.

    One transaction under a transaction-scoped advisory lock: a process that waited for it finds
    the migrations applied and applies nothing. A database migrated past what this version knows
    is refused (StorageError) rather than used with a schema it does not understand.
    """
    known = migrations()
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = {MIGRATION_LOCK_TIMEOUT_MS}")
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations"
                           " (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
        applied = await applied_versions(conn) or {}
        if applied and max(applied) > known[-1].version:
            raise StorageError(f"the database's schema is at version {max(applied)}, newer than this llm-proxy "
                               f"knows ({known[-1].version}): upgrade llm-proxy")
        pending = [migration for migration in known if migration.version not in applied]
        for migration in pending:
            await conn.execute(migration.sql)
            await conn.execute("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                               migration.version, now_text())
    return pending


async def connect_alone(url: str, application_name: str = "llm-proxy") -> Connection:
    """Open one connection of its own, outside any pool (for a command, or a lock held while serving)."""
    with translated(database_url_passwords(url), connecting=True):
        conn: Connection = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT,
                                                 server_settings={"application_name": application_name})
    return conn


async def close_alone(conn: Connection, passwords: Sequence[str]) -> None:
    """Close a connection of connect_alone(), waiting a little; one that does not answer is dropped."""
    try:
        with translated(passwords):
            await asyncio.wait_for(conn.close(), timeout=CONNECT_TIMEOUT)
    except (TimeoutError, StorageError, OSError):
        conn.terminate()


@contextlib.asynccontextmanager
async def one_connection(url: str) -> AsyncIterator[Connection]:
    """A connection of its own for the length of the block (a command's)."""
    conn = await connect_alone(url)
    try:
        yield conn
    finally:
        await close_alone(conn, database_url_passwords(url))


# ---- the pool ----

class Database:
    """A pool of connections to one PostgreSQL database; every write in one transaction of its own."""

    def __init__(self, url: str, *, lock_timeout_ms: int = LOCK_TIMEOUT_MS) -> None:
        self.url = url
        self.lock_timeout_ms = lock_timeout_ms
        self._passwords = database_url_passwords(url)
        self._pool: asyncpg.Pool | None = None
        self.migrated: list[Migration] = []  # what the last connect() applied

    def translated(self, *, connecting: bool = False) -> contextlib.AbstractContextManager[None]:
        """translated(), masking this database's passwords."""
        return translated(self._passwords, connecting=connecting)

    async def connect(self) -> None:
        """Open the pool and apply the migrations not applied yet; connecting again does nothing."""
        if self._pool is not None:
            return
        with self.translated(connecting=True):
            pool = await asyncpg.create_pool(
                self.url, min_size=1, max_size=POOL_MAX_SIZE, timeout=CONNECT_TIMEOUT, reset=_keep_session,
                server_settings={"application_name": "llm-proxy", "lock_timeout": str(self.lock_timeout_ms)})
            try:
                async with pool.acquire() as conn:
                    self.migrated = await migrate(conn)
            except BaseException:
                pool.terminate()
                raise
        self._pool = pool

    async def close(self) -> None:
        """Close the pool, waiting a little for connections in use; closing twice is harmless."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), timeout=CONNECT_TIMEOUT)
        except (TimeoutError, asyncpg.InterfaceError, OSError):
            pool.terminate()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """Lend one connection of the pool."""
        pool = self._pool
        if pool is None:
            raise StorageUnavailable("the database is not connected")
        with self.translated(connecting=True):
            conn = await pool.acquire()
        try:
            yield conn
        finally:
            await pool.release(conn)

    async def fetch(self, sql: str, *args: Any) -> list[Record]:
        """Run a read and return every row."""
        async with self.connection() as conn:
            with self.translated():
                return list(await conn.fetch(sql, *args))

    async def fetchrow(self, sql: str, *args: Any) -> Record | None:
        """Run a statement expected to give at most one row (a key lookup, RETURNING) and return it."""
        async with self.connection() as conn:
            with self.translated():
                row: Record | None = await conn.fetchrow(sql, *args)
                return row

    async def execute(self, sql: str, *args: Any) -> int:
        """Run one write statement (its own transaction) and return the rows it changed."""
        async with self.connection() as conn:
            with self.translated():
                return rows_changed(await conn.execute(sql, *args))

    async def write(self, work: Callable[[Connection], Awaitable[T]]) -> T:
        """Run `work` in one transaction (READ COMMITTED: work locks the rows it decides on).

        What work raises itself passes through as it is; the driver's errors are translated.
        """
        async with self.connection() as conn:
            with self.translated():
                async with conn.transaction():
                    return await work(conn)

    async def ping(self) -> bool:
        """Tell whether the database answers a trivial query."""
        try:
            await asyncio.wait_for(self.fetchrow("SELECT 1"), timeout=2.0)
        except (TimeoutError, StorageError):
            return False
        return True
