"""The schema's state for `llm-proxy db status` and `db migrate`: one connection of its own, no pool."""

from __future__ import annotations

from llm_proxy.settings import database_url_passwords
from llm_proxy.storage.postgres.database import Migration, applied_versions, migrate, one_connection, translated
from llm_proxy.storage.postgres.ownership import read_holder


async def schema_state(url: str) -> tuple[dict[int, str] | None, str | None]:
    """The versions schema_migrations records, with when (None: no such table), and who serves the
    database (None: no process claims it). Changes nothing and takes no lock."""
    async with one_connection(url) as conn:
        with translated(database_url_passwords(url)):
            applied = await applied_versions(conn)
            holder = await read_holder(conn)
    return applied, None if holder is None else holder.describe()


async def apply_migrations(url: str) -> list[Migration]:
    """Apply the migrations not applied yet, under the migration lock; return them."""
    async with one_connection(url) as conn:
        with translated(database_url_passwords(url)):
            return await migrate(conn)
