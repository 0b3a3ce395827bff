"""Token counters and per-project daily totals in PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from asyncpg import Connection

from llm_proxy.storage.postgres.database import Database
from llm_proxy.storage.rows import usage_days


class PostgresUsage:
    """The UsageStore of storage.base, on one Database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def save(self, counters: Sequence[tuple[int, int, int, int, str | None, str]],
                   daily: Sequence[tuple[str, str, int, int, int, int]]) -> None:
        if not counters and not daily:
            return

        async def work(conn: Connection) -> None:
            await conn.executemany(
                # Added, never set: each process writes what it counted itself, and additions commute.
                "UPDATE tokens SET request_count = request_count + $1, prompt_tokens = prompt_tokens + $2,"
                " completion_tokens = completion_tokens + $3, total_tokens = total_tokens + $4,"
                " last_used_at = GREATEST(last_used_at, $5) WHERE id = $6", counters)
            await conn.executemany(
                "INSERT INTO usage_daily (project_id, day, requests, prompt_tokens, completion_tokens, total_tokens)"
                " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (project_id, day) DO UPDATE SET"
                " requests = usage_daily.requests + excluded.requests,"
                " prompt_tokens = usage_daily.prompt_tokens + excluded.prompt_tokens,"
                " completion_tokens = usage_daily.completion_tokens + excluded.completion_tokens,"
                " total_tokens = usage_daily.total_tokens + excluded.total_tokens", daily)
        await self._db.write(work)

    async def daily(self, project_id: str, since: str | None, until: str | None) -> list[dict[str, Any]]:
        where, params = ["project_id = $1"], [project_id]
        first, last, last_included = usage_days(since, until)
        if first is not None:
            params.append(first)
            where.append(f"day >= ${len(params)}")
        if last is not None:
            params.append(last)
            where.append(f"day <= ${len(params)}" if last_included else f"day < ${len(params)}")
        rows = await self._db.fetch(
            "SELECT day, requests, prompt_tokens, completion_tokens, total_tokens FROM usage_daily"
            f" WHERE {' AND '.join(where)} ORDER BY day", *params)
        return [{"date": row[0], "requests": row[1], "prompt_tokens": row[2], "completion_tokens": row[3],
                 "total_tokens": row[4]} for row in rows]
