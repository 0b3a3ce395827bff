"""The PostgreSQL store: one connection pool, four record kinds."""

from __future__ import annotations

import logging

from llm_proxy.storage.postgres.audit import PostgresAudit
from llm_proxy.storage.postgres.database import LOCK_TIMEOUT_MS, Database
from llm_proxy.storage.postgres.projects import PostgresProjects
from llm_proxy.storage.postgres.tokens import PostgresTokens
from llm_proxy.storage.postgres.usage import PostgresUsage

log = logging.getLogger(__name__)


class PostgresStore:
    """The Store of storage.base on a PostgreSQL database (DATABASE_URL)."""

    def __init__(self, url: str, *, lock_timeout_ms: int = LOCK_TIMEOUT_MS) -> None:
        self.db = Database(url, lock_timeout_ms=lock_timeout_ms)
        self.projects = PostgresProjects(self.db)
        self.tokens = PostgresTokens(self.db)
        self.usage = PostgresUsage(self.db)
        self.audit = PostgresAudit(self.db)

    async def open(self) -> None:
        await self.db.connect()

    async def claim(self, owner: str) -> None:
        # The one-serving-process lock on PostgreSQL (an advisory lock held while serving) is not
        # built yet: say so at every start rather than pretend to hold it.
        log.warning("DATABASE_URL: this process does not claim the PostgreSQL database (its ownership lock is "
                    "not built yet): run one serving process per database")

    async def close(self) -> None:
        await self.db.close()

    async def ping(self) -> bool:
        return await self.db.ping()
