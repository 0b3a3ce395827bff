"""Open the gateway's own database, and its audit trail, for a command run on the gateway's host."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from llm_proxy.audit.writer import AuditWriter
from llm_proxy.ops.cli.configuration import configuration_error
from llm_proxy.ops.command_errors import CommandError, UsageError
from llm_proxy.settings import ConfigError, Settings
from llm_proxy.storage.base import Store
from llm_proxy.storage.errors import StorageError
from llm_proxy.storage.factory import describe_database, is_postgres, open_store

T = TypeVar("T")


async def with_store(settings: Settings, work: Callable[[Store], Awaitable[T]]) -> T:
    """Open the store (DATABASE_URL, else DATABASE_PATH), run work(store), close it; a storage failure becomes a
    CommandError naming the database (never its password)."""
    if not is_postgres(settings) and not settings.database_path.is_file():
        raise UsageError(f"DATABASE_PATH: no database at {settings.database_path}")
    try:
        store = open_store(settings)
    except ConfigError as exc:  # PostgreSQL without its driver installed
        raise configuration_error(exc) from None
    try:
        await store.open()
        return await work(store)
    except StorageError as exc:
        raise CommandError(f"database error at {describe_database(settings)}: {exc}") from None
    finally:
        await store.close()


async def with_database(settings: Settings, work: Callable[[Store, AuditWriter], Awaitable[T]]) -> T:
    """Open the gateway's store and an audit writer (actor `system`), run work(store, audit), close both."""
    async def with_audit(store: Store) -> T:
        audit = AuditWriter(store.audit, enabled=settings.audit_enabled, file_path=settings.audit_log_file,
                            create_dir=settings.audit_create_dir, store_in_db=settings.audit_store_in_db,
                            mask_client_ip=settings.audit_mask_client_ip, instance=settings.instance)
        try:
            try:
                await audit.start()
            except OSError as exc:
                raise CommandError(f"AUDIT_LOG_FILE: cannot open {settings.audit_log_file} ({exc.strerror})") from None
            return await work(store, audit)
        finally:
            await audit.close()

    return await with_store(settings, with_audit)
