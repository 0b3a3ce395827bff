"""The SQLite store: one file, one writer connection and one reader, five record kinds."""

from __future__ import annotations

from pathlib import Path

from llm_proxy.storage.sqlite.audit import SqliteAudit
from llm_proxy.storage.sqlite.database import Database
from llm_proxy.storage.sqlite.ownership import OwnerLock
from llm_proxy.storage.sqlite.projects import SqliteProjects
from llm_proxy.storage.sqlite.sessions import SqliteSessions
from llm_proxy.storage.sqlite.tokens import SqliteTokens
from llm_proxy.storage.sqlite.usage import SqliteUsage


class SqliteStore:
    """The Store of storage.base on a SQLite file (WAL)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = Database(path)
        self.projects = SqliteProjects(self.db)
        self.tokens = SqliteTokens(self.db)
        self.usage = SqliteUsage(self.db)
        self.sessions = SqliteSessions(self.db)
        self.audit = SqliteAudit(self.db)
        self._owner = OwnerLock(path)

    async def open(self) -> None:
        await self.db.connect()

    async def claim(self, owner: str, *, shared: bool = False) -> None:
        self._owner.claim(owner, shared=shared)

    async def close(self) -> None:
        try:
            await self.db.close()
        finally:
            self._owner.release()

    async def ping(self) -> bool:
        return await self.db.ping()
