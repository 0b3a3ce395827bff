"""Projects in SQLite."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import aiosqlite

from llm_proxy.models import Project, iso
from llm_proxy.storage.sqlite.database import Database

_COLUMNS = frozenset({"name", "api_key_encrypted", "api_key_hint", "is_active"})


def project_from_row(row: sqlite3.Row) -> Project:
    """Build the record of a projects row."""
    return Project(row["id"], row["name"], row["api_key_encrypted"], row["api_key_hint"],
                   bool(row["is_active"]), row["created_at"], row["updated_at"])


class SqliteProjects:
    """The ProjectStore of storage.base, on one Database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(self, name: str, api_key_encrypted: str, api_key_hint: str, now: float) -> Project:
        stamp = iso(now)
        project = Project(str(uuid.uuid4()), name, api_key_encrypted, api_key_hint, True, stamp, stamp)
        await self._db.execute(
            "INSERT INTO projects (id, name, api_key_encrypted, api_key_hint, is_active, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, 1, ?, ?)", (project.id, name, api_key_encrypted, api_key_hint, stamp, stamp))
        return project

    async def get(self, project_id: str) -> Project | None:
        row = await self._db.fetchone("SELECT * FROM projects WHERE id = ?", (project_id,))
        return None if row is None else project_from_row(row)

    async def all(self, active: bool | None = None) -> list[Project]:
        if active is None:
            rows = await self._db.fetchall("SELECT * FROM projects ORDER BY created_at, rowid")
        else:
            rows = await self._db.fetchall("SELECT * FROM projects WHERE is_active = ? ORDER BY created_at, rowid",
                                           (int(active),))
        return [project_from_row(row) for row in rows]

    async def update(self, project_id: str, columns: Mapping[str, Any], now: float) -> Project | None:
        assert set(columns) <= _COLUMNS, set(columns) - _COLUMNS  # names are formatted into the SQL
        values = {**columns, "updated_at": iso(now)}
        if "is_active" in values:
            values["is_active"] = int(values["is_active"])
        assignments = ", ".join(f"{column} = ?" for column in values)
        changed = await self._db.execute(f"UPDATE projects SET {assignments} WHERE id = ?",
                                         (*values.values(), project_id))
        return await self.get(project_id) if changed else None

    async def rekey(self, reencrypt: Callable[[str], str | None]) -> int:
        async def work(conn: aiosqlite.Connection) -> int:
            async with conn.execute("SELECT id, api_key_encrypted FROM projects") as cursor:
                rows = list(await cursor.fetchall())
            changed = [(new, row[0]) for row in rows if (new := reencrypt(row[1])) is not None]
            await conn.executemany("UPDATE projects SET api_key_encrypted = ? WHERE id = ?", changed)
            return len(changed)
        return await self._db.write(work)
