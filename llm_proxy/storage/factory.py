"""Pick the storage backend from the settings: SQLite at DATABASE_PATH, the default that needs nothing else."""

from __future__ import annotations

from llm_proxy.settings import Settings
from llm_proxy.storage.base import ChainHead, Store
from llm_proxy.storage.sqlite.audit import peek_chain_head
from llm_proxy.storage.sqlite.store import SqliteStore


def open_store(settings: Settings) -> Store:
    """Return the (not yet opened) store the settings name."""
    return SqliteStore(settings.database_path)


def peek_audit_head(settings: Settings) -> ChainHead | None:
    """Read the audit chain's head without creating or changing anything; None when there is no chain.

    Raises StorageError when the database cannot be read.
    """
    return peek_chain_head(settings.database_path)
