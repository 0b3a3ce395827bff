"""All SQL for projects and tokens: functions take the Database and return frozen records."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import aiosqlite

from llm_proxy.audit.chain import COLUMNS, event_from_row
from llm_proxy.audit.masking import obfuscate
from llm_proxy.crypto import KeyRing
from llm_proxy.errors import Conflict, ExpiredTokenConflict, NotFound
from llm_proxy.models import Project, TokenRecord, epoch, iso
from llm_proxy.storage.sqlite.database import Database


def _project(row: sqlite3.Row) -> Project:
    return Project(row["id"], row["name"], row["api_key_encrypted"], row["api_key_hint"],
                   bool(row["is_active"]), row["created_at"], row["updated_at"])


def _token(row: sqlite3.Row) -> TokenRecord:
    values = dict(row)
    values["is_active"] = bool(values["is_active"])
    return TokenRecord(**{name: values[name] for name in TokenRecord.__slots__})


def _is_unique_violation(exc: sqlite3.IntegrityError) -> bool:
    return "UNIQUE" in str(exc)


# ---- projects ----

async def create_project(db: Database, keyring: KeyRing, name: str, api_key: str, now: float) -> Project:
    """Insert a project with its upstream key encrypted; 409 when the name is taken."""
    stamp = iso(now)
    project = Project(str(uuid.uuid4()), name, keyring.encrypt(api_key), obfuscate(api_key), True, stamp, stamp)
    try:
        await db.execute(
            "INSERT INTO projects (id, name, api_key_encrypted, api_key_hint, is_active, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, 1, ?, ?)",
            (project.id, name, project.api_key_encrypted, project.api_key_hint, stamp, stamp))
    except sqlite3.IntegrityError as exc:
        if _is_unique_violation(exc):
            raise Conflict("a project with this name already exists", param="name") from None
        raise
    return project


async def get_project(db: Database, project_id: str) -> Project:
    """Fetch one project or raise NotFound."""
    row = await db.fetchone("SELECT * FROM projects WHERE id = ?", (project_id,))
    if row is None:
        raise NotFound("project not found")
    return _project(row)


async def list_projects(db: Database, active: bool | None = None) -> list[Project]:
    """List projects, oldest first, optionally only active or only inactive ones."""
    if active is None:
        rows = await db.fetchall("SELECT * FROM projects ORDER BY created_at, rowid")
    else:
        rows = await db.fetchall("SELECT * FROM projects WHERE is_active = ? ORDER BY created_at, rowid",
                                 (int(active),))
    return [_project(row) for row in rows]


async def update_project(db: Database, keyring: KeyRing, project_id: str, changes: Mapping[str, Any],
                         now: float) -> Project:
    """Apply name / api_key / is_active changes; 404 when absent, 409 on a taken name."""
    columns: dict[str, Any] = {}
    if "name" in changes:
        columns["name"] = changes["name"]
    if "api_key" in changes:
        columns["api_key_encrypted"] = keyring.encrypt(changes["api_key"])
        columns["api_key_hint"] = obfuscate(changes["api_key"])
    if "is_active" in changes:
        columns["is_active"] = int(changes["is_active"])
    columns["updated_at"] = iso(now)
    assignments = ", ".join(f"{column} = ?" for column in columns)
    try:
        changed = await db.execute(f"UPDATE projects SET {assignments} WHERE id = ?",
                                   (*columns.values(), project_id))
    except sqlite3.IntegrityError as exc:
        if _is_unique_violation(exc):
            raise Conflict("a project with this name already exists", param="name") from None
        raise
    if not changed:
        raise NotFound("project not found")
    return await get_project(db, project_id)


async def replace_encrypted_keys(db: Database, keyring: KeyRing) -> int:
    """Re-encrypt every project key not already under the current key, in one transaction."""
    async def work(conn: aiosqlite.Connection) -> int:
        async with conn.execute("SELECT id, api_key_encrypted FROM projects") as cursor:
            rows = list(await cursor.fetchall())
        stale = [(keyring.encrypt(keyring.decrypt(row[1])), row[0]) for row in rows
                 if not keyring.is_current(row[1])]
        await conn.executemany("UPDATE projects SET api_key_encrypted = ? WHERE id = ?", stale)
        return len(stale)
    return await db.write(work)


# ---- tokens ----

async def create_token(db: Database, *, token_hash: str, token_hint: str, project_id: str, expires_at: float,
                       max_requests: int | None, rate_limit_per_minute: int | None,
                       max_tokens_total: int | None, now: float) -> TokenRecord:
    """Insert a token row (digest only) and return it."""
    token_id = str(uuid.uuid4())
    await db.execute(
        "INSERT INTO tokens (id, token_hash, token_hint, project_id, expires_at, is_active, max_requests,"
        " rate_limit_per_minute, max_tokens_total, created_at) VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?, ?)",
        (token_id, token_hash, token_hint, project_id, iso(expires_at), max_requests, rate_limit_per_minute,
         max_tokens_total, iso(now)))
    return await get_token(db, token_id)


async def get_token(db: Database, token_id: str) -> TokenRecord:
    """Fetch one token by id or raise NotFound."""
    row = await db.fetchone("SELECT * FROM tokens WHERE id = ?", (token_id,))
    if row is None:
        raise NotFound("token not found")
    return _token(row)


async def find_token_by_hash(db: Database, token_hash: str) -> tuple[TokenRecord, Project] | None:
    """Fetch a token and its project by the token's digest."""
    row = await db.fetchone("SELECT * FROM tokens WHERE token_hash = ?", (token_hash,))
    if row is None:
        return None
    token = _token(row)
    return token, await get_project(db, token.project_id)


async def list_tokens(db: Database, project_id: str | None = None, active_only: bool = False,
                      now: float | None = None) -> list[TokenRecord]:
    """List tokens, oldest first; active_only leaves out revoked, inactive and expired ones."""
    where, params = [], []
    if project_id is not None:
        where.append("project_id = ?")
        params.append(project_id)
    if active_only:
        where.append("is_active = 1 AND revoked_at IS NULL AND expires_at > ?")
        params.append(iso(now if now is not None else datetime.now(UTC).timestamp()))
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    rows = await db.fetchall(f"SELECT * FROM tokens{clause} ORDER BY created_at, rowid", params)
    return [_token(row) for row in rows]


async def update_token(db: Database, token_id: str, changes: Mapping[str, Any]) -> TokenRecord:
    """Apply is_active / limit changes to a token; 404 when absent."""
    allowed = ("is_active", "max_requests", "rate_limit_per_minute", "max_tokens_total", "expires_at")
    columns = {name: (int(value) if name == "is_active" else value)
               for name, value in changes.items() if name in allowed}
    if "expires_at" in columns:
        columns["expires_at"] = iso(columns["expires_at"])
    if columns:
        assignments = ", ".join(f"{column} = ?" for column in columns)
        changed = await db.execute(f"UPDATE tokens SET {assignments} WHERE id = ?", (*columns.values(), token_id))
        if not changed:
            raise NotFound("token not found")
    return await get_token(db, token_id)


async def revoke_token(db: Database, token_id: str, now: float) -> bool:
    """Soft-revoke one token; return False when it was already revoked (404 when absent)."""
    changed = await db.execute(
        "UPDATE tokens SET is_active = 0, revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (iso(now), token_id))
    if not changed:
        await get_token(db, token_id)
    return bool(changed)


async def revoke_project_tokens(db: Database, project_id: str, now: float) -> tuple[list[str], int, int]:
    """Revoke every token of a project; return (ids newly revoked, already revoked count, total)."""
    async def work(conn: aiosqlite.Connection) -> tuple[list[str], int, int]:
        async with conn.execute("SELECT id, revoked_at FROM tokens WHERE project_id = ?", (project_id,)) as cursor:
            rows = list(await cursor.fetchall())
        fresh = [row[0] for row in rows if row[1] is None]
        await conn.executemany("UPDATE tokens SET is_active = 0, revoked_at = ? WHERE id = ?",
                               [(iso(now), token_id) for token_id in fresh])
        return fresh, len(rows) - len(fresh), len(rows)
    return await db.write(work)


async def save_usage(db: Database, counters: Iterable[tuple[int, int, int, int, str | None, str]],
                     daily: Iterable[tuple[str, str, int, int, int, int]]) -> None:
    """In one transaction, persist token counters (request_count, prompt, completion, total,
    last_used_at, id) and add daily deltas (project_id, day, requests, prompt, completion, total)."""
    counter_rows, daily_rows = list(counters), list(daily)
    if not counter_rows and not daily_rows:
        return

    async def work(conn: aiosqlite.Connection) -> None:
        await conn.executemany(
            "UPDATE tokens SET request_count = ?, prompt_tokens = ?, completion_tokens = ?, total_tokens = ?,"
            " last_used_at = ? WHERE id = ?", counter_rows)
        await conn.executemany(
            "INSERT INTO usage_daily (project_id, day, requests, prompt_tokens, completion_tokens, total_tokens)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (project_id, day) DO UPDATE SET"
            " requests = requests + excluded.requests, prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
            " completion_tokens = completion_tokens + excluded.completion_tokens,"
            " total_tokens = total_tokens + excluded.total_tokens", daily_rows)
    await db.write(work)


async def project_usage(db: Database, project_id: str, since: str | None, until: str | None) -> list[dict[str, Any]]:
    """Return a project's daily totals, oldest first, for the days that overlap [since, until)."""
    where, params = ["project_id = ?"], [project_id]
    if since is not None:
        where.append("day >= ?")
        params.append(since[:10])
    if until is not None:
        # Days are whole: an `until` within a day (not at its midnight) keeps that day, since part of
        # it is before `until`; at midnight the day starts there and is left out.
        where.append("day < ?" if until.endswith("T00:00:00Z") else "day <= ?")
        params.append(until[:10])
    rows = await db.fetchall(
        "SELECT day, requests, prompt_tokens, completion_tokens, total_tokens FROM usage_daily"
        f" WHERE {' AND '.join(where)} ORDER BY day", params)
    return [{"date": row[0], "requests": row[1], "prompt_tokens": row[2], "completion_tokens": row[3],
             "total_tokens": row[4]} for row in rows]


def check_refreshable(token: TokenRecord, now: float) -> None:
    """Raise Conflict unless the token may be refreshed: not already replaced, not expired, not revoked, active.

    Expiry is decided by expires_at, not by whether the housekeeping job has marked the token yet:
    a stolen token past its expiry must be worth nothing, not a minute's chance of a fresh one.
    """
    if token.replaced_by is not None:
        raise Conflict("this token was already refreshed; refresh its successor instead")
    if epoch(token.expires_at) <= now:
        raise ExpiredTokenConflict()
    if token.revoked_at is not None or not token.is_active:
        raise Conflict("a revoked or inactive token cannot be refreshed")


async def refresh_token(db: Database, token_id: str, *, token_hash: str, token_hint: str, expires_at: float,
                        old_stops_at: float, now: float) -> TokenRecord:
    """In one transaction, issue a successor with the old token's project and limits and retire the old one.

    Raise Conflict (nothing written) when the old token is already replaced, revoked or inactive.
    """
    new_id = str(uuid.uuid4())

    async def work(conn: aiosqlite.Connection) -> None:
        # Checked again under the write lock: two refreshes that both passed the caller's check must
        # not both issue a live successor (each with the full quota).
        async with conn.execute("SELECT * FROM tokens WHERE id = ?", (token_id,)) as cursor:
            row = await cursor.fetchone()
        if row is None:
            raise NotFound("token not found")
        old = _token(row)
        check_refreshable(old, now)
        await conn.execute(
            "INSERT INTO tokens (id, token_hash, token_hint, project_id, expires_at, is_active, max_requests,"
            " rate_limit_per_minute, max_tokens_total, created_at) VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?, ?)",
            (new_id, token_hash, token_hint, old.project_id, iso(expires_at), old.max_requests,
             old.rate_limit_per_minute, old.max_tokens_total, iso(now)))
        if old_stops_at <= now:
            await conn.execute("UPDATE tokens SET is_active = 0, revoked_at = ?, replaced_by = ? WHERE id = ?",
                               (iso(now), new_id, old.id))
        else:
            await conn.execute("UPDATE tokens SET expires_at = MIN(expires_at, ?), replaced_by = ? WHERE id = ?",
                               (iso(old_stops_at), new_id, old.id))
    await db.write(work)
    return await get_token(db, new_id)


# ---- audit queries ----

async def list_audit_events(db: Database, *, filters: Mapping[str, str], since: str | None, until: str | None,
                            before: int | None, limit: int) -> list[dict[str, Any]]:
    """Return events newest first, filtered on exact action/project_id/result, a time range and a seq cursor."""
    where: list[str] = []
    params: list[Any] = []
    for column in ("action", "project_id", "result"):
        if column in filters:
            where.append(f"{column} = ?")
            params.append(filters[column])
    if since is not None:
        where.append("timestamp >= ?")
        params.append(since)
    if until is not None:
        where.append("timestamp < ?")
        params.append(until)
    if before is not None:
        where.append("seq < ?")
        params.append(before)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    rows = await db.fetchall(f"SELECT {', '.join(COLUMNS)} FROM audit_events{clause} ORDER BY seq DESC LIMIT ?",
                             (*params, limit))
    return [event_from_row(row) for row in rows]


async def deactivate_expired_tokens(db: Database, now: float) -> list[tuple[str, str, str]]:
    """Mark tokens past their expiry inactive; return (id, project_id, token_hint) of each one changed."""
    async def work(conn: aiosqlite.Connection) -> list[tuple[str, str, str]]:
        async with conn.execute(
                "SELECT id, project_id, token_hint FROM tokens"
                " WHERE is_active = 1 AND revoked_at IS NULL AND expires_at <= ?", (iso(now),)) as cursor:
            rows = [(row[0], row[1], row[2]) for row in await cursor.fetchall()]
        await conn.executemany("UPDATE tokens SET is_active = 0 WHERE id = ?", [(row[0],) for row in rows])
        return rows
    return await db.write(work)
