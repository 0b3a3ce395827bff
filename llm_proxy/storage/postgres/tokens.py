"""Tokens in PostgreSQL (digests only, never a plaintext)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from asyncpg import Connection, Record

from llm_proxy.models import Project, TokenRecord, iso
from llm_proxy.storage.postgres.database import Database
from llm_proxy.storage.postgres.projects import project_from_row

_COLUMNS = frozenset({"is_active", "max_requests", "rate_limit_per_minute", "max_tokens_total", "expires_at"})
TOKEN_COLUMNS = ", ".join(TokenRecord.__slots__)
_ORDER = " ORDER BY created_at, created_order"
_INSERT = ("INSERT INTO tokens (id, token_hash, token_hint, project_id, expires_at, is_active, max_requests,"
           " rate_limit_per_minute, max_tokens_total, created_at) VALUES ($1, $2, $3, $4, $5, TRUE, $6, $7, $8, $9)"
           f" RETURNING {TOKEN_COLUMNS}")
# find(): the token and its project in one round trip (the project's columns prefixed "p_").
_FIND = (f"SELECT {', '.join(f't.{name}' for name in TokenRecord.__slots__)},"
         " p.id AS p_id, p.name AS p_name, p.api_key_encrypted AS p_api_key_encrypted,"
         " p.api_key_hint AS p_api_key_hint, p.is_active AS p_is_active, p.created_at AS p_created_at,"
         " p.updated_at AS p_updated_at"
         " FROM tokens t JOIN projects p ON p.id = t.project_id WHERE t.token_hash = $1")


def token_from_row(row: Record) -> TokenRecord:
    """Build the record of a tokens row (TOKEN_COLUMNS)."""
    return TokenRecord(**{name: row[name] for name in TokenRecord.__slots__})


class PostgresTokens:
    """The TokenStore of storage.base, on one Database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(self, *, token_hash: str, token_hint: str, project_id: str, expires_at: float,
                     max_requests: int | None, rate_limit_per_minute: int | None, max_tokens_total: int | None,
                     now: float) -> TokenRecord:
        row = await self._db.fetchrow(_INSERT, str(uuid.uuid4()), token_hash, token_hint, project_id, iso(expires_at),
                                      max_requests, rate_limit_per_minute, max_tokens_total, iso(now))
        assert row is not None
        return token_from_row(row)

    async def get(self, token_id: str) -> TokenRecord | None:
        row = await self._db.fetchrow(f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = $1", token_id)
        return None if row is None else token_from_row(row)

    async def find(self, token_hash: str) -> tuple[TokenRecord, Project] | None:
        row = await self._db.fetchrow(_FIND, token_hash)
        if row is None:
            return None
        project = project_from_row({name.removeprefix("p_"): value for name, value in row.items()
                                    if name.startswith("p_")})
        return token_from_row(row), project

    async def all(self, project_id: str | None = None, *, active_only: bool = False,
                   now: float = 0.0) -> list[TokenRecord]:
        where: list[str] = []
        params: list[Any] = []
        if project_id is not None:
            params.append(project_id)
            where.append(f"project_id = ${len(params)}")
        if active_only:
            params.append(iso(now))
            where.append(f"is_active AND revoked_at IS NULL AND expires_at > ${len(params)}")
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = await self._db.fetch(f"SELECT {TOKEN_COLUMNS} FROM tokens{clause}{_ORDER}", *params)
        return [token_from_row(row) for row in rows]

    async def update(self, token_id: str, columns: Mapping[str, Any]) -> TokenRecord | None:
        assert set(columns) <= _COLUMNS, set(columns) - _COLUMNS  # names are formatted into the SQL
        values = dict(columns)
        if "expires_at" in values:
            values["expires_at"] = iso(values["expires_at"])
        if not values:
            return await self.get(token_id)
        assignments = ", ".join(f"{column} = ${number}" for number, column in enumerate(values, 2))
        row = await self._db.fetchrow(f"UPDATE tokens SET {assignments} WHERE id = $1 RETURNING {TOKEN_COLUMNS}",
                                      token_id, *values.values())
        return None if row is None else token_from_row(row)

    async def revoke(self, token_ids: Sequence[str], now: float) -> list[str]:
        ids = list(dict.fromkeys(token_ids))
        rows = await self._db.fetch("UPDATE tokens SET is_active = FALSE, revoked_at = $1"
                                    " WHERE id = ANY($2::text[]) AND revoked_at IS NULL RETURNING id", iso(now), ids)
        revoked = {row[0] for row in rows}
        return [token_id for token_id in ids if token_id in revoked]  # in the order given, as SQLite's

    async def revoke_project(self, project_id: str, now: float) -> tuple[list[str], int]:
        async def work(conn: Connection) -> tuple[list[str], int]:
            rows = await conn.fetch(f"SELECT id, revoked_at FROM tokens WHERE project_id = $1{_ORDER} FOR UPDATE",
                                    project_id)
            fresh = [row[0] for row in rows if row[1] is None]
            await conn.execute("UPDATE tokens SET is_active = FALSE, revoked_at = $1 WHERE id = ANY($2::text[])",
                               iso(now), fresh)
            return fresh, len(rows)
        return await self._db.write(work)

    async def refresh(self, token_id: str, *, check: Callable[[TokenRecord], None], token_hash: str,
                      token_hint: str, expires_at: float, old_stops_at: float, now: float) -> TokenRecord | None:
        async def work(conn: Connection) -> TokenRecord | None:
            # Checked under the row's lock: two refreshes that both passed an earlier check must not
            # both issue a live successor (each with the full quota), from any process.
            row = await conn.fetchrow(f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = $1 FOR UPDATE", token_id)
            if row is None:
                return None
            old = token_from_row(row)
            check(old)
            new = await conn.fetchrow(_INSERT, str(uuid.uuid4()), token_hash, token_hint, old.project_id,
                                      iso(expires_at), old.max_requests, old.rate_limit_per_minute,
                                      old.max_tokens_total, iso(now))
            assert new is not None
            if old_stops_at <= now:
                await conn.execute("UPDATE tokens SET is_active = FALSE, revoked_at = $1, replaced_by = $2"
                                   " WHERE id = $3", iso(now), new["id"], old.id)
            else:
                await conn.execute("UPDATE tokens SET expires_at = LEAST(expires_at, $1), replaced_by = $2"
                                   " WHERE id = $3", iso(old_stops_at), new["id"], old.id)
            return token_from_row(new)
        return await self._db.write(work)

    async def deactivate_expired(self, now: float) -> list[TokenRecord]:
        async def work(conn: Connection) -> list[TokenRecord]:
            rows = await conn.fetch(f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE is_active AND revoked_at IS NULL"
                                    f" AND expires_at <= $1{_ORDER} FOR UPDATE", iso(now))
            expired = [token_from_row(row) for row in rows]
            await conn.execute("UPDATE tokens SET is_active = FALSE WHERE id = ANY($1::text[])",
                               [token.id for token in expired])
            return expired
        return await self._db.write(work)
