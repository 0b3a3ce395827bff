"""Projects in PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from typing import Any

from asyncpg import Connection

from llm_proxy.models import Project, iso
from llm_proxy.storage.postgres.database import Database

_COLUMNS = frozenset({"name", "api_key_encrypted", "api_key_hint", "is_active"})
PROJECT_COLUMNS = "id, name, api_key_encrypted, api_key_hint, is_active, created_at, updated_at"


def project_from_row(row: Mapping[str, Any]) -> Project:
    """Build the record of a projects row (PROJECT_COLUMNS)."""
    return Project(row["id"], row["name"], row["api_key_encrypted"], row["api_key_hint"], row["is_active"],
                   row["created_at"], row["updated_at"])


class PostgresProjects:
    """The ProjectStore of storage.base, on one Database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(self, name: str, api_key_encrypted: str, api_key_hint: str, now: float) -> Project:
        stamp = iso(now)
        project = Project(str(uuid.uuid4()), name, api_key_encrypted, api_key_hint, True, stamp, stamp)
        await self._db.execute(
            "INSERT INTO projects (id, name, api_key_encrypted, api_key_hint, is_active, created_at, updated_at)"
            " VALUES ($1, $2, $3, $4, TRUE, $5, $5)", project.id, name, api_key_encrypted, api_key_hint, stamp)
        return project

    async def get(self, project_id: str) -> Project | None:
        row = await self._db.fetchrow(f"SELECT {PROJECT_COLUMNS} FROM projects WHERE id = $1", project_id)
        return None if row is None else project_from_row(row)

    async def all(self, active: bool | None = None) -> list[Project]:
        if active is None:
            rows = await self._db.fetch(f"SELECT {PROJECT_COLUMNS} FROM projects ORDER BY created_at, created_order")
        else:
            rows = await self._db.fetch(f"SELECT {PROJECT_COLUMNS} FROM projects WHERE is_active = $1"
                                        " ORDER BY created_at, created_order", active)
        return [project_from_row(row) for row in rows]

    async def update(self, project_id: str, columns: Mapping[str, Any], now: float) -> Project | None:
        assert set(columns) <= _COLUMNS, set(columns) - _COLUMNS  # names are formatted into the SQL
        values = {**columns, "updated_at": iso(now)}
        assignments = ", ".join(f"{column} = ${number}" for number, column in enumerate(values, 2))
        row = await self._db.fetchrow(f"UPDATE projects SET {assignments} WHERE id = $1 RETURNING {PROJECT_COLUMNS}",
                                      project_id, *values.values())
        return None if row is None else project_from_row(row)

    async def rekey(self, reencrypt: Callable[[str], str | None]) -> int:
        async def work(conn: Connection) -> int:
            rows = await conn.fetch("SELECT id, api_key_encrypted FROM projects ORDER BY created_order FOR UPDATE")
            changed = [(new, row[0]) for row in rows if (new := reencrypt(row[1])) is not None]
            await conn.executemany("UPDATE projects SET api_key_encrypted = $1 WHERE id = $2", changed)
            return len(changed)
        return await self._db.write(work)
