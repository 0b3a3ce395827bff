"""SQLite locked by another process (the sqlite3 shell, a backup) while the gateway serves, through real HTTP.

The lock is held by a child process (tests.fakes.locked), so every test here is a `system` test.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestServer

from llm_proxy.app import AUDIT
from llm_proxy.audit.writer import AuditWriter
from llm_proxy.storage.sqlite import database
from tests.fakes import Gateway, bearer, eventually, locked, scalar, serving_like_serve

pytestmark = pytest.mark.system

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def test_database_locked_by_another_process_serves_from_memory_and_loses_nothing(make_gateway: Any) -> None:
    """A 2 s exclusive lock: proxying goes on from memory, management writes wait for it, no event or count is lost."""
    gateway = await make_gateway(RATE_LIMIT_PER_MINUTE="0")
    token = await gateway.token()
    path = gateway.settings.database_path
    chat = {"json": CHAT, "headers": bearer(token)}
    async with gateway.client.post("/v1/chat/completions", **chat) as warm:
        assert warm.status == 200
    served, latencies = 1, []

    async with locked(path):
        write = asyncio.ensure_future(gateway.client.post("/manage/projects", json={"name": "during-lock",
                                                                                   "api_key": "sk-x" * 8},
                                                          headers=gateway.auth))
        until = time.monotonic() + 2.0
        while time.monotonic() < until:  # traffic for as long as the lock is held
            started = time.monotonic()
            async with gateway.client.post("/v1/chat/completions", **chat) as response:
                assert response.status == 200
                await response.read()
            latencies.append(time.monotonic() - started)
            served += 1
        async with gateway.client.get("/ready") as ready, gateway.client.get("/manage/tokens",
                                                                             headers=gateway.auth) as listed:
            assert (ready.status, listed.status) == (200, 200)  # readers are not blocked (WAL)
        assert not write.done(), "a management write went through while another process held the lock"
    released = time.monotonic()

    async with await write as created:
        assert created.status == 201, await created.text()
    assert time.monotonic() >= released
    assert served > 10 and max(latencies) < 0.5, (served, max(latencies))
    access = "SELECT count(*) FROM audit_events WHERE action = 'token.access'"
    await eventually(lambda: scalar(path, access) == served, f"{served} token.access rows")
    await eventually(lambda: scalar(path, "SELECT request_count FROM tokens WHERE id = ?", (token["id"],)) == served,
                     f"request_count {served} persisted")
    assert scalar(path, "SELECT count(*) FROM projects WHERE name = 'during-lock'") == 1


async def test_events_refused_by_a_locked_database_are_stored_by_shutdown(make_gateway: Any,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock outlasting busy_timeout and every retry, then released: a clean shutdown still stores every event."""
    monkeypatch.setattr(database, "BUSY_TIMEOUT_MS", 50)
    monkeypatch.setattr(AuditWriter, "DB_RETRY_DELAYS", (0.01, 0.01, 0.01))
    gateway = await make_gateway()
    token = await gateway.token()
    audit = gateway.app[AUDIT]
    path = gateway.settings.database_path

    async with locked(path):
        for _ in range(3):
            async with gateway.client.post("/v1/chat/completions", json=CHAT, headers=bearer(token)) as response:
                assert response.status == 200
        await eventually(lambda: audit.db_errors >= 1, "the audit writer to give up on the locked database")
        await audit.flush()
        async with gateway.client.get("/metrics", headers=gateway.auth) as scrape:  # the operator sees it
            exported = re.search(r"^llm_proxy_audit_db_errors_total (\S+)$", await scrape.text(), re.MULTILINE)
        assert exported is not None and float(exported.group(1)) >= 1
    await gateway.close()  # what SIGTERM does, after the lock is gone

    assert scalar(path, "SELECT count(*) FROM audit_events WHERE action = 'token.access'") == 3


# ---- a management client that gives up while its write waits for the lock ----

async def abandon_a_write_during_a_lock(gateway: Gateway) -> None:
    """POST /manage/projects while another process holds the lock; give up after 0.3 s, as a client would."""
    await gateway.app[AUDIT].flush()  # the audit writer is idle: the handler's write is the one waiting
    async with locked(gateway.settings.database_path):
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await gateway.client.post("/manage/projects", json={"name": "abandoned", "api_key": "sk-x" * 8},
                                          headers=gateway.auth)
        server = gateway.client.server.runner.server  # type: ignore[union-attr]
        # The server cancels the handler in the same callback that forgets the connection.
        await eventually(lambda: not server.connections, "the server to drop the abandoned connection")


async def test_a_management_client_leaving_during_a_lock_does_not_wedge_the_database(
        tmp_path: Path, upstream: tuple[Any, TestServer]) -> None:
    """A write cancelled while it waits for the lock leaves no transaction open: later writes, ours or not, work."""
    async with serving_like_serve(tmp_path, str(upstream[1].make_url("")).rstrip("/")) as gateway:
        await gateway.project("before")
        await abandon_a_write_during_a_lock(gateway)

        after = await gateway.client.post("/manage/projects", json={"name": "after", "api_key": "sk-x" * 8},
                                          headers=gateway.auth)
        assert after.status == 201, await after.text()
        def write_from_elsewhere() -> None:
            with closing(sqlite3.connect(gateway.settings.database_path, timeout=5, isolation_level=None)) as other:
                other.execute("BEGIN IMMEDIATE")  # another process (the CLI) can write again
                other.execute("ROLLBACK")

        # In a thread: blocking the event loop would stall the gateway's own short transactions.
        await asyncio.to_thread(write_from_elsewhere)


async def test_a_management_write_abandoned_by_its_client_is_not_audited_as_success(
        tmp_path: Path, upstream: tuple[Any, TestServer]) -> None:
    """The project.create event of a request cancelled before its write says `error`, and no project exists."""
    async with serving_like_serve(tmp_path, str(upstream[1].make_url("")).rstrip("/")) as gateway:
        await gateway.project("before")
        await abandon_a_write_during_a_lock(gateway)
        path = gateway.settings.audit_log_file
        assert path is not None

        def creations() -> list[dict[str, Any]]:
            events = (orjson.loads(line) for line in path.read_bytes().splitlines())
            return [event for event in events if event["action"] == "project.create"]

        await eventually(lambda: len(creations()) == 2, "the abandoned request's project.create event", timeout=10)
        listed = await gateway.manage("GET", "/projects", expect=200)

    assert [project["name"] for project in listed["data"]] == ["before"]
    assert creations()[-1]["result"] == "error"
