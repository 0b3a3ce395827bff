"""The admin console's sessions in PostgreSQL."""

from __future__ import annotations

from asyncpg import Connection

from llm_proxy.models import AdminSession
from llm_proxy.storage.postgres.database import Database, rows_changed


class PostgresSessions:
    """The SessionStore of storage.base, on one Database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(self, session: AdminSession) -> None:
        await self._db.execute("INSERT INTO admin_sessions (id_hash, token_hash, created_at, last_seen_at)"
                               " VALUES ($1, $2, $3, $4)",
                               session.id_hash, session.token_hash, session.created_at, session.last_seen_at)

    async def get(self, id_hash: str) -> AdminSession | None:
        row = await self._db.fetchrow("SELECT id_hash, token_hash, created_at, last_seen_at FROM admin_sessions"
                                      " WHERE id_hash = $1", id_hash)
        return None if row is None else AdminSession(row[0], row[1], row[2], row[3])

    async def touch(self, id_hash: str, when: float) -> None:
        await self._db.execute("UPDATE admin_sessions SET last_seen_at = $2 WHERE id_hash = $1 AND last_seen_at < $2",
                               id_hash, when)

    async def delete(self, id_hash: str) -> bool:
        return await self._db.execute("DELETE FROM admin_sessions WHERE id_hash = $1", id_hash) > 0

    async def delete_expired(self, *, idle_since: float, created_since: float) -> int:
        async def work(conn: Connection) -> int:
            await conn.execute("DELETE FROM admin_form_uses WHERE used_at < $1", created_since)
            return rows_changed(await conn.execute(
                "DELETE FROM admin_sessions WHERE last_seen_at < $1 OR created_at < $2", idle_since, created_since))
        return await self._db.write(work)

    async def use_once(self, once_hash: str, session_hash: str, when: float) -> bool:
        inserted = await self._db.execute("INSERT INTO admin_form_uses (once_hash, session_hash, used_at)"
                                          " VALUES ($1, $2, $3) ON CONFLICT (once_hash) DO NOTHING",
                                          once_hash, session_hash, when)
        return inserted == 1

    async def forget_once(self, once_hash: str) -> None:
        await self._db.execute("DELETE FROM admin_form_uses WHERE once_hash = $1", once_hash)
