"""Tokens in SQLite (digests only, never a plaintext)."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aiosqlite

from llm_proxy.models import Project, TokenRecord, iso
from llm_proxy.storage.sqlite.database import Database
from llm_proxy.storage.sqlite.projects import project_from_row

_COLUMNS = frozenset({"is_active", "max_requests", "rate_limit_per_minute", "max_tokens_total", "expires_at"})
_INSERT = ("INSERT INTO tokens (id, token_hash, token_hint, project_id, expires_at, is_active, max_requests,"
           " rate_limit_per_minute, max_tokens_total, created_at) VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?, ?)")


def token_from_row(row: sqlite3.Row) -> TokenRecord:
    """Build the record of a tokens row."""
    values = dict(row)
    values["is_active"] = bool(values["is_active"])
    return TokenRecord(**{name: values[name] for name in TokenRecord.__slots__})


class SqliteTokens:
    """The TokenStore of storage.base, on one Database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(self, *, token_hash: str, token_hint: str, project_id: str, expires_at: float,
                     max_requests: int | None, rate_limit_per_minute: int | None, max_tokens_total: int | None,
                     now: float) -> TokenRecord:
        token_id = str(uuid.uuid4())
        await self._db.execute(_INSERT, (token_id, token_hash, token_hint, project_id, iso(expires_at), max_requests,
                                         rate_limit_per_minute, max_tokens_total, iso(now)))
        token = await self.get(token_id)
        assert token is not None
        return token

    async def get(self, token_id: str) -> TokenRecord | None:
        row = await self._db.fetchone("SELECT * FROM tokens WHERE id = ?", (token_id,))
        return None if row is None else token_from_row(row)

    async def find(self, token_hash: str) -> tuple[TokenRecord, Project] | None:
        row = await self._db.fetchone("SELECT * FROM tokens WHERE token_hash = ?", (token_hash,))
        if row is None:
            return None
        token = token_from_row(row)
        project = await self._db.fetchone("SELECT * FROM projects WHERE id = ?", (token.project_id,))
        return None if project is None else (token, project_from_row(project))

    async def all(self, project_id: str | None = None, *, active_only: bool = False,
                   now: float = 0.0) -> list[TokenRecord]:
        where: list[str] = []
        params: list[Any] = []
        if project_id is not None:
            where.append("project_id = ?")
            params.append(project_id)
        if active_only:
            where.append("is_active = 1 AND revoked_at IS NULL AND expires_at > ?")
            params.append(iso(now))
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = await self._db.fetchall(f"SELECT * FROM tokens{clause} ORDER BY created_at, rowid", params)
        return [token_from_row(row) for row in rows]

    async def update(self, token_id: str, columns: Mapping[str, Any]) -> TokenRecord | None:
        assert set(columns) <= _COLUMNS, set(columns) - _COLUMNS  # names are formatted into the SQL
        values = dict(columns)
        if "is_active" in values:
            values["is_active"] = int(values["is_active"])
        if "expires_at" in values:
            values["expires_at"] = iso(values["expires_at"])
        if values:
            assignments = ", ".join(f"{column} = ?" for column in values)
            if not await self._db.execute(f"UPDATE tokens SET {assignments} WHERE id = ?",
                                          (*values.values(), token_id)):
                return None
        return await self.get(token_id)

    async def revoke(self, token_ids: Sequence[str], now: float) -> list[str]:
        async def work(conn: aiosqlite.Connection) -> list[str]:
            revoked = []
            for token_id in token_ids:
                cursor = await conn.execute("UPDATE tokens SET is_active = 0, revoked_at = ?"
                                            " WHERE id = ? AND revoked_at IS NULL", (iso(now), token_id))
                if cursor.rowcount:
                    revoked.append(token_id)
            return revoked
        return await self._db.write(work)

    async def revoke_project(self, project_id: str, now: float) -> tuple[list[str], int]:
        async def work(conn: aiosqlite.Connection) -> tuple[list[str], int]:
            async with conn.execute("SELECT id, revoked_at FROM tokens WHERE project_id = ?",
                                    (project_id,)) as cursor:
                rows = list(await cursor.fetchall())
            fresh = [row[0] for row in rows if row[1] is None]
            await conn.executemany("UPDATE tokens SET is_active = 0, revoked_at = ? WHERE id = ?",
                                   [(iso(now), token_id) for token_id in fresh])
            return fresh, len(rows)
        return await self._db.write(work)

    async def refresh(self, token_id: str, *, check: Callable[[TokenRecord], None], token_hash: str,
                      token_hint: str, expires_at: float, old_stops_at: float, now: float) -> TokenRecord | None:
        new_id = str(uuid.uuid4())

        async def work(conn: aiosqlite.Connection) -> bool:
            # Checked under the write lock: two refreshes that both passed an earlier check must not
            # both issue a live successor (each with the full quota).
            async with conn.execute("SELECT * FROM tokens WHERE id = ?", (token_id,)) as cursor:
                row = await cursor.fetchone()
            if row is None:
                return False
            old = token_from_row(row)
            check(old)
            await conn.execute(_INSERT, (new_id, token_hash, token_hint, old.project_id, iso(expires_at),
                                         old.max_requests, old.rate_limit_per_minute, old.max_tokens_total, iso(now)))
            if old_stops_at <= now:
                await conn.execute("UPDATE tokens SET is_active = 0, revoked_at = ?, replaced_by = ? WHERE id = ?",
                                   (iso(now), new_id, old.id))
            else:
                await conn.execute("UPDATE tokens SET expires_at = MIN(expires_at, ?), replaced_by = ? WHERE id = ?",
                                   (iso(old_stops_at), new_id, old.id))
            return True
        return await self.get(new_id) if await self._db.write(work) else None

    async def deactivate_expired(self, now: float) -> list[TokenRecord]:
        async def work(conn: aiosqlite.Connection) -> list[TokenRecord]:
            async with conn.execute("SELECT * FROM tokens WHERE is_active = 1 AND revoked_at IS NULL"
                                    " AND expires_at <= ?", (iso(now),)) as cursor:
                expired = [token_from_row(row) for row in await cursor.fetchall()]
            await conn.executemany("UPDATE tokens SET is_active = 0 WHERE id = ?", [(t.id,) for t in expired])
            return expired
        return await self._db.write(work)
