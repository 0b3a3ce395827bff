"""Token counters and per-project daily totals in SQLite."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiosqlite

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
                "UPDATE tokens SET request_count = ?, prompt_tokens = ?, completion_tokens = ?, total_tokens = ?,"
                " last_used_at = ? WHERE id = ?", counters)
            await conn.executemany(
                "INSERT INTO usage_daily (project_id, day, requests, prompt_tokens, completion_tokens, total_tokens)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (project_id, day) DO UPDATE SET"
                " requests = requests + excluded.requests, prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
                " completion_tokens = completion_tokens + excluded.completion_tokens,"
                " total_tokens = total_tokens + excluded.total_tokens", daily)
        await self._db.write(work)

    async def daily(self, project_id: str, since: str | None, until: str | None) -> list[dict[str, Any]]:
        where, params = ["project_id = ?"], [project_id]
        if since is not None:
            where.append("day >= ?")
            params.append(since[:10])
        if until is not None:
            # Days are whole: an `until` within a day (not at its midnight) keeps that day, since part of
            # it is before `until`; at midnight (a bare date means its midnight) the day is left out.
            at_midnight = len(until) == 10 or until.endswith("T00:00:00Z")
            where.append("day < ?" if at_midnight else "day <= ?")
            params.append(until[:10])
        rows = await self._db.fetchall(
            "SELECT day, requests, prompt_tokens, completion_tokens, total_tokens FROM usage_daily"
            f" WHERE {' AND '.join(where)} ORDER BY day", params)
        return [{"date": row[0], "requests": row[1], "prompt_tokens": row[2], "completion_tokens": row[3],
                 "total_tokens": row[4]} for row in rows]
