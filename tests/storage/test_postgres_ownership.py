"""One serving process per PostgreSQL database: a session-level advisory lock held while a process serves.

The PostgreSQL side of tests/storage/test_sqlite_ownership.py and tests/ops/test_ownership.py, on a real
server (tests/servers.py), a fresh database per test.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp.test_utils import TestServer

from llm_proxy.app import create_app
from llm_proxy.storage.errors import DatabaseOwned, StorageError
from tests.fakes import REPO, UpstreamState, make_settings, serve_env, wait_healthy
from tests.servers import postgres_bindir, private_postgres

asyncpg = pytest.importorskip("asyncpg")  # the `postgres` extra (under CI a skip fails the run)

from llm_proxy.storage.postgres.ownership import APPLICATION_NAME, OWNER_LOCK  # noqa: E402
from llm_proxy.storage.postgres.store import PostgresStore  # noqa: E402

HOLDER = """
import asyncio, os, sys
from llm_proxy.storage.postgres.store import PostgresStore

async def main():
    store = PostgresStore(os.environ["OWNED_URL"])
    await store.open()
    await store.claim(sys.argv[1])
    print("claimed", flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


async def rows(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Read through a connection of the test's own, not the store's."""
    conn = await asyncpg.connect(url)
    try:
        return [tuple(row) for row in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


async def lock_holders(url: str) -> list[int]:
    """The server pids of the sessions holding the owner lock, read from pg_locks as an administrator would."""
    found = await rows(url, "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
                       " AND classid = $1 AND objid = $2", OWNER_LOCK >> 32, OWNER_LOCK & 0xFFFFFFFF)
    return [pid for (pid,) in found]


async def nobody_holds(url: str) -> bool:
    return await lock_holders(url) == []


async def until(check: Callable[[], Any], what: str, timeout: float = 15.0) -> None:
    """Poll an async or plain check until it holds, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        outcome = check()
        if asyncio.iscoroutine(outcome):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def make_store(postgres_url: str) -> AsyncIterator[Callable[..., Any]]:
    """Open stores on the test's database (each its own pool and, once it claims, its own lock session)."""
    stores: list[PostgresStore] = []

    async def make(**options: Any) -> PostgresStore:
        store = PostgresStore(postgres_url, **options)
        await store.open()
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


async def test_a_second_claim_is_refused_naming_the_owner(postgres_url: str, make_store: Callable[..., Any]) -> None:
    first, second = await make_store(), await make_store()
    await first.claim("pid 1 on host-a since 2026-12-02T10:00:00Z")
    with pytest.raises(DatabaseOwned) as refused:
        await second.claim("pid 2 on host-b since 2026-12-02T10:00:01Z")
    assert refused.value.holder == "pid 1 on host-a since 2026-12-02T10:00:00Z"
    assert isinstance(refused.value, StorageError)
    await first.claim("again")  # claiming what it holds does nothing
    assert await rows(postgres_url, "SELECT owner FROM serving_owner") == [
        ("pid 1 on host-a since 2026-12-02T10:00:00Z",)]
    # The lock is held on a session of its own, which pg_stat_activity names; the refused store kept none.
    holders = await lock_holders(postgres_url)
    assert len(holders) == 1
    assert await rows(postgres_url, "SELECT application_name FROM pg_stat_activity WHERE pid = $1",
                      holders[0]) == [(APPLICATION_NAME,)]
    # The refused store still works as a store: a CLI command opens the database beside the server.
    await second.projects.create("beside", "enc:v1:x", "sk-****", 1_700_000_000)


async def test_a_released_claim_can_be_taken_and_names_nobody(postgres_url: str,
                                                              make_store: Callable[..., Any]) -> None:
    first, second = await make_store(), await make_store()
    await first.claim("first")
    await first.close()
    await first.close()  # closing twice is harmless
    assert await rows(postgres_url, "SELECT owner FROM serving_owner") == []
    assert await lock_holders(postgres_url) == []
    await second.claim("second")
    assert await rows(postgres_url, "SELECT owner FROM serving_owner") == [("second",)]


async def test_a_row_left_behind_names_nobody(postgres_url: str, make_store: Callable[..., Any]) -> None:
    """A row whose session no longer holds the lock (its process was killed) is neither believed nor in the way."""
    store = await make_store()
    await store.db.execute("INSERT INTO serving_owner (id, owner, backend_pid, claimed_at)"
                           " VALUES (1, 'pid 9 on gone since 2020-01-01T00:00:00Z', 1, '2020-01-01T00:00:00Z')")
    await store.claim("me")
    assert await rows(postgres_url, "SELECT owner FROM serving_owner") == [("me",)]


async def test_a_lock_held_without_a_name_names_its_session(postgres_url: str, make_store: Callable[..., Any]) -> None:
    """Between taking the lock and writing its name, a holder is still named, by its server session."""
    other = await asyncpg.connect(postgres_url)
    try:
        assert await other.fetchval("SELECT pg_try_advisory_lock($1)", OWNER_LOCK)
        store = await make_store()
        with pytest.raises(DatabaseOwned) as refused:
            await store.claim("me")
        assert refused.value.holder == f"another process (PostgreSQL session {other.get_server_pid()})"
    finally:
        await other.close()
    await store.claim("me")  # the session ended, and the lock with it


async def test_a_lost_claim_is_taken_back(postgres_url: str, make_store: Callable[..., Any],
                                          caplog: pytest.LogCaptureFixture) -> None:
    """PostgreSQL ends the lock's session (a restart, an administrator): the gateway serves on and takes it back."""
    store = await make_store(owner_check_interval=0.1)
    await store.claim("me")
    [lost] = await lock_holders(postgres_url)
    with caplog.at_level(logging.WARNING, logger="llm_proxy.storage.postgres.ownership"):
        assert await rows(postgres_url, "SELECT pg_terminate_backend($1)", lost) == [(True,)]
        await until(lambda: store.owner.held and lock_holders(postgres_url), "the claim taken back")
        [again] = await lock_holders(postgres_url)
        assert again != lost
        assert await rows(postgres_url, "SELECT owner, backend_pid FROM serving_owner") == [("me", again)]
    messages = [record.getMessage() for record in caplog.records]
    assert any("lost the connection that holds this process's claim" in message for message in messages), messages
    assert any("holds its claim on the database again" in message for message in messages), messages
    assert await store.ping()  # the pool never noticed


async def test_a_claim_taken_while_lost_is_logged_and_taken_back_once_free(
        postgres_url: str, make_store: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    first, second = await make_store(owner_check_interval=1.0), await make_store()
    await first.claim("pid 1 on host-a")
    [lost] = await lock_holders(postgres_url)
    with caplog.at_level(logging.WARNING, logger="llm_proxy.storage.postgres.ownership"):
        await rows(postgres_url, "SELECT pg_terminate_backend($1)", lost)
        await until(lambda: nobody_holds(postgres_url), "the first store's session to end")
        await second.claim("pid 2 on host-b")  # first waits check_interval before its first try

        def named_the_other() -> bool:
            return any(record.levelno == logging.ERROR and "pid 2 on host-b claimed it" in record.getMessage()
                       for record in caplog.records)
        await until(named_the_other, "an ERROR naming the process that took the claim")
        assert not first.owner.held
        await second.close()
        await until(lambda: first.owner.held, "the claim taken back once free")
    assert await rows(postgres_url, "SELECT owner FROM serving_owner") == [("pid 1 on host-a",)]
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1, errors  # once per holder, not once per try


async def test_a_second_gateway_on_an_owned_database_does_not_start(
        postgres_url: str, tmp_path: Path, make_gateway: Callable[..., Any]) -> None:
    first = await make_gateway(DATABASE_URL=postgres_url)
    second = TestServer(create_app(make_settings(tmp_path, DATABASE_URL=postgres_url)), host="127.0.0.1")
    with pytest.raises(DatabaseOwned, match=rf"^pid {os.getpid()} on .+ since \d{{4}}-\d\d-\d\dT"):
        await second.start_server()
    await second.close()
    assert (await first.manage("GET", "/projects", expect=200))["data"] == []  # the owner is untouched


@pytest.mark.system
async def test_a_killed_owner_leaves_no_lock_behind(postgres_url: str, make_store: Callable[..., Any]) -> None:
    """Another process holds the claim; `kill -9` it and the server ends its session, and the lock with it."""
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, "the other process", cwd=REPO, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO), "OWNED_URL": postgres_url})
    try:
        assert holder.stdout is not None
        assert await asyncio.wait_for(holder.stdout.readline(), timeout=30) == b"claimed\n"
        store = await make_store()
        with pytest.raises(DatabaseOwned, match=r"^the other process$"):
            await store.claim("me")
        holder.send_signal(signal.SIGKILL)
        await holder.wait()
        # The server notices the socket close at once, but ends the session in its own time.
        await until(lambda: nobody_holds(postgres_url), "the killed holder's session to end")
    finally:
        if holder.returncode is None:
            holder.kill()  # only the process this test started
            await holder.wait()
    await until(lambda: nobody_holds(postgres_url), "no holder")
    await store.claim("me")
    assert await rows(postgres_url, "SELECT owner FROM serving_owner") == [("me",)]


async def _serve(env: dict[str, str], tmp_path: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "llm_proxy", "serve", env=env, cwd=tmp_path,
                                                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)


@pytest.mark.system
async def test_a_second_serve_refuses_with_one_line_naming_database_url_and_the_owner(
        tmp_path: Path, postgres_url: str, upstream: tuple[UpstreamState, TestServer]) -> None:
    _, server = upstream
    password = urlsplit(postgres_url).password
    assert password
    upstream_url = str(server.make_url("")).rstrip("/")
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    env = serve_env(tmp_path / "one", DATABASE_URL=postgres_url, OPENAI_API_URL=upstream_url)
    port = int(env["LISTEN_ADDR"].rpartition(":")[2])
    first = await _serve(env, tmp_path)
    try:
        await wait_healthy(port, first)
        assert first.returncode is None, await first.communicate()

        # Another host's files, the same PostgreSQL database: refused, in one line.
        second = await _serve(serve_env(tmp_path / "two", DATABASE_URL=postgres_url, OPENAI_API_URL=upstream_url),
                              tmp_path)
        out, err = await asyncio.wait_for(second.communicate(), timeout=60)
        assert second.returncode == 1, err
        lines = [line for line in err.decode().splitlines() if not line.startswith('{"time"')]
        assert len(lines) == 1, err
        parts = urlsplit(postgres_url)
        assert lines[0].startswith(f"llm-proxy: cannot start: DATABASE_URL postgresql://llm:***@{parts.hostname}:"
                                   f"{parts.port}{parts.path} is already served by pid {first.pid} on "), lines[0]
        assert lines[0].endswith("; stop that process first (one serving process per database)"), lines[0]
        assert password not in out.decode() + err.decode()
        assert "listening on" not in err.decode()

        # Killed with -9, the owner leaves the database free: the next serve starts.
        first.kill()
        await first.wait()
        await until(lambda: nobody_holds(postgres_url), "the killed owner's session to end")
        third_env = serve_env(tmp_path / "two", DATABASE_URL=postgres_url, OPENAI_API_URL=upstream_url)
        third = await _serve(third_env, tmp_path)
        try:
            await wait_healthy(int(third_env["LISTEN_ADDR"].rpartition(":")[2]), third)
            assert third.returncode is None, await third.communicate()
            [(owner,)] = await rows(postgres_url, "SELECT owner FROM serving_owner")
            assert owner.startswith(f"pid {third.pid} on "), owner
            third.send_signal(signal.SIGTERM)
            _, third_err = await asyncio.wait_for(third.communicate(), timeout=30)
            assert third.returncode == 0, third_err
            assert password not in third_err.decode()
        finally:
            if third.returncode is None:
                third.kill()  # only the process this test started
                await third.wait()
        assert await rows(postgres_url, "SELECT owner FROM serving_owner") == []  # a clean stop names nobody
    finally:
        if first.returncode is None:
            first.kill()  # only the process this test started
            await first.wait()


@pytest.mark.system
async def test_a_claim_is_taken_back_after_postgresql_restarts(caplog: pytest.LogCaptureFixture) -> None:
    """A real restart (pg_ctl restart -m fast) of a PostgreSQL of this test's own: the serving store loses its
    lock with the server, serves on, and holds the lock again once the server is back, with no restart."""
    with private_postgres() as server:
        store = PostgresStore(server.url, owner_check_interval=0.2)
        await store.open()
        try:
            await store.claim("pid 1 on host-a")
            [before] = await lock_holders(server.url)
            [(data,)] = await rows(server.url, "SHOW data_directory")
            bindir = postgres_bindir()
            assert bindir is not None
            restart = [str(bindir / "pg_ctl"), "-D", data, "-l", str(Path(data).parent / "restart.log"),
                       "-m", "fast", "-w", "restart"]
            with caplog.at_level(logging.WARNING, logger="llm_proxy.storage.postgres.ownership"):
                done = await asyncio.to_thread(
                    subprocess.run, ["runuser", "-u", "postgres", "--", *restart] if os.geteuid() == 0 else restart,
                    capture_output=True, timeout=60)
                assert done.returncode == 0, done.stderr
                await until(lambda: store.owner.held, "the claim taken back after the restart", timeout=30)
            [after] = await lock_holders(server.url)
            assert after != before
            assert await rows(server.url, "SELECT owner FROM serving_owner") == [("pid 1 on host-a",)]
            messages = [record.getMessage() for record in caplog.records]
            assert any("lost the connection" in message for message in messages), messages
            assert any("holds its claim on the database again" in message for message in messages), messages
            await until(store.ping, "the pool to serve again")
        finally:
            await store.close()
