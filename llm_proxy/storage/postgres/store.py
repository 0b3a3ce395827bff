"""The PostgreSQL store: one connection pool, five record kinds, and the claim of the process serving it."""

from __future__ import annotations

from llm_proxy.storage.postgres.audit import PostgresAudit
from llm_proxy.storage.postgres.database import LOCK_TIMEOUT_MS, Database
from llm_proxy.storage.postgres.ownership import CHECK_INTERVAL, OwnerLock
from llm_proxy.storage.postgres.projects import PostgresProjects
from llm_proxy.storage.postgres.sessions import PostgresSessions
from llm_proxy.storage.postgres.tokens import PostgresTokens
from llm_proxy.storage.postgres.usage import PostgresUsage


class PostgresStore:
    """The Store of storage.base on a PostgreSQL database (DATABASE_URL)."""

    def __init__(self, url: str, *, lock_timeout_ms: int = LOCK_TIMEOUT_MS,
                 owner_check_interval: float = CHECK_INTERVAL) -> None:
        self.db = Database(url, lock_timeout_ms=lock_timeout_ms)
        self.projects = PostgresProjects(self.db)
        self.tokens = PostgresTokens(self.db)
        self.usage = PostgresUsage(self.db)
        self.sessions = PostgresSessions(self.db)
        self.audit = PostgresAudit(self.db)
        self.owner = OwnerLock(url, check_interval=owner_check_interval)

    async def open(self) -> None:
        await self.db.connect()

    async def claim(self, owner: str, *, shared: bool = False) -> None:
        await self.owner.claim(owner, shared=shared)

    async def close(self) -> None:
        try:
            await self.db.close()
        finally:
            await self.owner.release()

    async def ping(self) -> bool:
        return await self.db.ping()
