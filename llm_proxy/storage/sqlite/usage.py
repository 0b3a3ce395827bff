"""Token counters and per-project daily totals in SQLite."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiosqlite

from llm_proxy.storage.rows import usage_days
from llm_proxy.storage.sqlite.database import Database


class SqliteUsage:
    """The UsageStore of storage.base, on one Database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def save(self, counters: Sequence[tuple[int, int, int, int, str | None, str]],
                   daily: Sequence[tuple[str, str, int, int, int, int]]) -> None:
        if not counters and not daily:
            return

        async def work(conn: aiosqlite.Connection) -> None:
            await conn.executemany(
                # Added, never set: each process writes what it counted itself, and additions commute.
                # MAX with a NULL is NULL, hence the COALESCE: the later of the two last uses, or the one there is.
                "UPDATE tokens SET request_count = request_count + ?, prompt_tokens = prompt_tokens + ?,"
                " completion_tokens = completion_tokens + ?, total_tokens = total_tokens + ?,"
                " last_used_at = COALESCE(MAX(last_used_at, ?5), last_used_at, ?5) WHERE id = ?6", counters)
            await conn.executemany(
                "INSERT INTO usage_daily (project_id, day, requests, prompt_tokens, completion_tokens, total_tokens)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (project_id, day) DO UPDATE SET"
                " requests = requests + excluded.requests, prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
                " completion_tokens = completion_tokens + excluded.completion_tokens,"
                " total_tokens = total_tokens + excluded.total_tokens", daily)
        await self._db.write(work)

    async def daily(self, project_id: str, since: str | None, until: str | None) -> list[dict[str, Any]]:
        where, params = ["project_id = ?"], [project_id]
        first, last, last_included = usage_days(since, until)
        if first is not None:
            where.append("day >= ?")
            params.append(first)
        if last is not None:
            where.append("day <= ?" if last_included else "day < ?")
            params.append(last)
        rows = await self._db.fetchall(
            "SELECT day, requests, prompt_tokens, completion_tokens, total_tokens FROM usage_daily"
            f" WHERE {' AND '.join(where)} ORDER BY day", params)
        return [{"date": row[0], "requests": row[1], "prompt_tokens": row[2], "completion_tokens": row[3],
                 "total_tokens": row[4]} for row in rows]
