"""Pick the storage backend from the settings: SQLite at DATABASE_PATH (the default, needing nothing
else), or PostgreSQL at DATABASE_URL (the `postgres` extra, imported only then)."""

from __future__ import annotations

import asyncio

from llm_proxy.settings import ConfigError, Settings, redact_database_url
from llm_proxy.storage.base import ChainHead, Store
from llm_proxy.storage.sqlite.audit import peek_chain_head
from llm_proxy.storage.sqlite.store import SqliteStore

_NO_ASYNCPG = "PostgreSQL needs the asyncpg package: pip install 'llm-proxy[postgres]'"


def is_postgres(settings: Settings) -> bool:
    """Tell whether the settings name a PostgreSQL database (otherwise SQLite at DATABASE_PATH)."""
    return bool(settings.database_url)


def describe_database(settings: Settings) -> str:
    """Name the database for the operator: DATABASE_URL without its password, or the SQLite file."""
    if is_postgres(settings):
        return redact_database_url(settings.database_url)
    return str(settings.database_path)


def database_variable(settings: Settings) -> str:
    """The variable that names the database: what an error about it should point at."""
    return "DATABASE_URL" if is_postgres(settings) else "DATABASE_PATH"


def open_store(settings: Settings) -> Store:
    """Return the (not yet opened) store the settings name; ConfigError when its driver is not installed."""
    if not is_postgres(settings):
        return SqliteStore(settings.database_path)
    try:
        from llm_proxy.storage.postgres.store import PostgresStore
    except ImportError:
        raise ConfigError("DATABASE_URL", _NO_ASYNCPG) from None
    return PostgresStore(settings.database_url)


def peek_audit_head(settings: Settings) -> ChainHead | None:
    """Read the audit chain's head without creating or changing anything; None when there is no chain.

    Raises StorageError when the database cannot be read (call it where no event loop is running).
    """
    if not is_postgres(settings):
        return peek_chain_head(settings.database_path)
    try:
        from llm_proxy.storage.postgres import audit
    except ImportError:
        raise ConfigError("DATABASE_URL", _NO_ASYNCPG) from None
    return asyncio.run(audit.peek_chain_head(settings.database_url))
