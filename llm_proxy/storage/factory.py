"""Pick the storage backend from the settings or a URL: SQLite at DATABASE_PATH (the default, needing nothing
else), or PostgreSQL at DATABASE_URL (the `postgres` extra, imported only then); and, for the `db`
commands, a database's schema state, its migrations, and a copy from one database to another."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from llm_proxy.settings import ConfigError, Settings, parse_database_url, redact_database_url
from llm_proxy.storage.base import ChainHead, Store
from llm_proxy.storage.errors import StorageError
from llm_proxy.storage.sqlite import database as sqlite_database
from llm_proxy.storage.sqlite import transfer as sqlite_transfer
from llm_proxy.storage.sqlite.audit import peek_chain_heads
from llm_proxy.storage.sqlite.ownership import current_owner
from llm_proxy.storage.sqlite.store import SqliteStore

_NO_ASYNCPG = "PostgreSQL needs the asyncpg package: pip install 'llm-proxy[postgres]'"

# A database as the settings name it: a SQLite file, or a PostgreSQL URL.
Database = Path | str


@contextlib.contextmanager
def _asyncpg_for(variable: str) -> Iterator[None]:
    """Import PostgreSQL's modules inside: a missing driver is a ConfigError naming `variable`."""
    try:
        yield
    except ImportError:
        raise ConfigError(variable, _NO_ASYNCPG) from None


def is_postgres(settings: Settings) -> bool:
    """Tell whether the settings name a PostgreSQL database (otherwise SQLite at DATABASE_PATH)."""
    return bool(settings.database_url)


def settings_database(settings: Settings) -> Database:
    """The database the settings name: the PostgreSQL URL, else the SQLite file."""
    return settings.database_url or settings.database_path


def parse_database(url: str, variable: str) -> Database:
    """Read a database URL (sqlite:///PATH, postgresql://…) as DATABASE_URL is read; ConfigError naming
    `variable` when it is not one."""
    try:
        return parse_database_url(url)
    except ValueError as exc:
        raise ConfigError(variable, str(exc)) from None


def show_database(database: Database) -> str:
    """Name a database for the operator: a PostgreSQL URL without its password, or the SQLite file."""
    return str(database) if isinstance(database, Path) else redact_database_url(database)


def describe_database(settings: Settings) -> str:
    """Name the database for the operator: DATABASE_URL without its password, or the SQLite file."""
    return show_database(settings_database(settings))


def database_variable(settings: Settings) -> str:
    """The variable that names the database: what an error about it should point at."""
    return "DATABASE_URL" if is_postgres(settings) else "DATABASE_PATH"


def open_store(settings: Settings) -> Store:
    """Return the (not yet opened) store the settings name; ConfigError when its driver is not installed."""
    if not is_postgres(settings):
        return SqliteStore(settings.database_path)
    with _asyncpg_for("DATABASE_URL"):
        from llm_proxy.storage.postgres.store import PostgresStore
    return PostgresStore(settings.database_url)


def peek_audit_heads(settings: Settings) -> dict[str, ChainHead] | None:
    """Read every audit chain's head without creating or changing anything; None when there is no chain.

    Raises StorageError when the database cannot be read (call it where no event loop is running).
    """
    if not is_postgres(settings):
        return peek_chain_heads(settings.database_path)
    with _asyncpg_for("DATABASE_URL"):
        from llm_proxy.storage.postgres import audit
    return asyncio.run(audit.peek_chain_heads(settings.database_url))


# ---- the schema: `db status`, `db migrate` ----

Version = tuple[int, str]  # (number, name) of a migration


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    """Where a database's schema stands against the migrations this version of llm-proxy knows."""

    backend: str  # "sqlite" or "postgresql"
    database: str  # as shown to the operator, never with a password
    exists: bool  # False: a SQLite file not created yet
    known: tuple[Version, ...]
    applied: dict[int, str]  # version -> when it was applied
    served_by: str | None  # the serving process's owner text; None: none serves it
    served_by_known: bool = True  # False: whether one does cannot be told here

    @property
    def pending(self) -> list[Version]:
        """The known migrations not applied yet, in order."""
        return [version for version in self.known if version[0] not in self.applied]

    @property
    def unknown(self) -> list[int]:
        """Applied versions this llm-proxy does not know: the database was migrated by a newer one."""
        known = {number for number, _ in self.known}
        return sorted(number for number in self.applied if number not in known)

    @property
    def up_to_date(self) -> bool:
        return not self.pending and not self.unknown


async def schema_status(database: Database, variable: str = "DATABASE_URL") -> SchemaStatus:
    """Read where the database's schema stands, changing nothing and taking no lock (a server may be running)."""
    if isinstance(database, Path):
        applied = sqlite_database.recorded_versions(database)
        try:
            owner, told = current_owner(database), True
        except OSError:
            owner, told = None, False
        return SchemaStatus("sqlite", show_database(database), database.is_file(), sqlite_database.MIGRATIONS,
                            applied or {}, owner, told)
    with _asyncpg_for(variable):
        from llm_proxy.storage.postgres import schema
        from llm_proxy.storage.postgres.database import migrations
    applied, holder = await schema.schema_state(database)
    return SchemaStatus("postgresql", show_database(database), True,
                        tuple((m.version, m.name) for m in migrations()), applied or {}, holder)


async def migrate_schema(database: Database, variable: str = "DATABASE_URL") -> list[Version]:
    """Apply the migrations the database lacks (creating a SQLite file that is not there); return them."""
    if isinstance(database, Path):
        return await sqlite_database.migrate(database)
    with _asyncpg_for(variable):
        from llm_proxy.storage.postgres import schema
    return [(m.version, m.name) for m in await schema.apply_migrations(database)]


# ---- `db copy` ----

# What a copy carries, parents first, the audit chains' recorded heads included. schema_migrations
# (the target keeps its own), serving_owner (nobody serves the copy yet) and admin_sessions (the
# console's operators sign in again) stay behind.
COPIED_TABLES = ("projects", "tokens", "usage_daily", "audit_events", "audit_chain")
# Columns the target numbers itself, in the order the rows come (the source's order is kept).
_NUMBERED = {"audit_events": "id"}


class TargetNotEmpty(StorageError):
    """A copy's target already holds rows; args[0] says which tables hold how many."""


@dataclass(frozen=True, slots=True)
class CopyResult:
    """The rows a copy wrote, per table."""

    rows: dict[str, int]


class _Snapshot(Protocol):
    async def columns(self, table: str) -> list[str]: ...
    def rows(self, table: str, columns: Sequence[str], batch_size: int) -> AsyncIterator[list[tuple[Any, ...]]]: ...


class _Load(Protocol):
    async def columns(self, table: str) -> list[str]: ...
    async def count(self, table: str) -> int: ...
    async def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None: ...


def _snapshot(database: Database, variable: str) -> contextlib.AbstractAsyncContextManager[_Snapshot]:
    if isinstance(database, Path):
        return sqlite_transfer.snapshot(database)
    with _asyncpg_for(variable):
        from llm_proxy.storage.postgres import transfer
    return transfer.snapshot(database)


def _load(database: Database, variable: str) -> contextlib.AbstractAsyncContextManager[_Load]:
    if isinstance(database, Path):
        return sqlite_transfer.load(database)
    with _asyncpg_for(variable):
        from llm_proxy.storage.postgres import transfer
    return transfer.load(database)


async def _occupied(load: _Load) -> dict[str, int]:
    return {table: count for table in COPIED_TABLES if (count := await load.count(table))}


async def _copied_columns(side: _Snapshot | _Load, table: str) -> list[str]:
    return [name for name in await side.columns(table) if name != _NUMBERED.get(table)]


async def copy_database(source: Database, target: Database, *, batch_size: int = 1000,
                        variables: tuple[str, str] = ("--from", "--to")) -> CopyResult:
    """Copy every row of COPIED_TABLES from source into an empty target.

    The source is read as of one moment and never changed; the target is written in one transaction,
    `batch_size` rows at a time, so a copy that fails or is refused (TargetNotEmpty) leaves it as it was.
    Values are copied as stored: encrypted upstream keys, token digests, timestamps' text, audit details
    byte for byte, so the chain verifies on the copy.
    """
    rows: dict[str, int] = {}
    async with _snapshot(source, variables[0]) as reading:
        columns = {table: await _copied_columns(reading, table) for table in COPIED_TABLES}
        if missing := [table for table, names in columns.items() if not names]:
            raise StorageError(f"{show_database(source)} is not an llm-proxy database (no {', '.join(missing)} table)")
        async with _load(target, variables[1]) as writing:
            if occupied := await _occupied(writing):
                held = ", ".join(f"{table}: {count}" for table, count in occupied.items())
                raise TargetNotEmpty(f"{show_database(target)} is not empty ({held})")
            for table, names in columns.items():
                theirs = await _copied_columns(writing, table)
                if set(theirs) != set(names):
                    only = sorted(set(names) ^ set(theirs))
                    raise StorageError(f"the two databases' {table} tables differ ({', '.join(only)}): run "
                                       "`llm-proxy db migrate` on both with this version of llm-proxy")
                rows[table] = 0
                async for batch in reading.rows(table, names, batch_size):
                    await writing.insert(table, names, batch)
                    rows[table] += len(batch)
    return CopyResult(rows)
