"""`llm-proxy db status`, `db migrate` and `db copy`, on real SQLite files and a real PostgreSQL server.

The fast tests run the CLI in this process (in a thread, so the test's loop keeps serving a gateway);
the system tests run it, and the gateway, as processes, as an operator moving from SQLite would.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from llm_proxy.ops.cli import main
from llm_proxy.settings import VARIABLES
from tests.fakes import (
    ENCRYPTION_KEY,
    MANAGEMENT_TOKEN,
    UPSTREAM_KEY,
    Gateway,
    UpstreamState,
    bearer,
    child_env,
    free_port,
)
from tests.ops.test_cli import Result, run_process

asyncpg = pytest.importorskip("asyncpg")  # the `postgres` extra (under CI a skip fails the run)

from llm_proxy.storage.postgres.store import PostgresStore  # noqa: E402

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
# Each table in the order its rows were written: ties in created_at keep it (SQLite's rowid,
# PostgreSQL's created_order).
ORDERS = {"projects": ("created_at, rowid", "created_at, created_order"),
          "tokens": ("created_at, rowid", "created_at, created_order"),
          "usage_daily": ("project_id, day", "project_id, day"),
          "audit_events": ("id", "id"),
          "audit_chain": ("instance", "instance")}
# What is compared: every column, but the position each database gives an audit event itself.
SELECTED = {"audit_events": "instance, seq, timestamp, action, actor, project_id, request_id, client_ip, result,"
                            " details, hash"}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No gateway variable leaks in from the developer's shell, and no stray .env is read."""
    monkeypatch.chdir(tmp_path)
    for name in (*VARIABLES, "LLM_PROXY_URL"):
        monkeypatch.delenv(name, raising=False)


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> Result:
    """Run the CLI in a worker thread (it runs its own event loop), so this test's loop keeps serving."""
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return Result(code, out, err)


def gateway_env(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    """Give the CLI the configuration a gateway on this host has."""
    for name, value in {"MANAGEMENT_TOKEN": MANAGEMENT_TOKEN, "ENCRYPTION_KEY": ENCRYPTION_KEY, **values}.items():
        monkeypatch.setenv(name, value)


def one_line(result: Result, code: int, *fragments: str) -> str:
    assert result.code == code, result
    assert "Traceback" not in result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llm-proxy: "), result.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def sqlite_rows(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every copied row of a SQLite database, each table in the order it was written."""
    with closing(sqlite3.connect(path)) as conn:
        return {table: [tuple(row) for row in conn.execute(f"SELECT {SELECTED.get(table, '*')} FROM {table}"
                                                            f" ORDER BY {order}")]
                for table, (order, _) in ORDERS.items()}


async def postgres_rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every copied row of a PostgreSQL database, as SQLite holds it (flags 0/1, created_order left out)."""
    conn = await asyncpg.connect(url)
    try:
        found = {}
        for table, (_, order) in ORDERS.items():
            records = await conn.fetch(f"SELECT {SELECTED.get(table, '*')} FROM {table} ORDER BY {order}")
            found[table] = [tuple(int(value) if isinstance(value, bool) else value
                                  for name, value in record.items() if name != "created_order")
                            for record in records]
        return found
    finally:
        await conn.close()


async def postgres_counts(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        return {table: await conn.fetchval(f"SELECT count(*) FROM {table}")
                for table in ("projects", "tokens", "usage_daily", "audit_events")}
    finally:
        await conn.close()


async def traffic(gateway: Gateway) -> dict[str, Any]:
    """Projects (three created within one second), tokens, answered requests and a revocation: every table gets rows."""
    projects = [await gateway.project(name) for name in ("alpha", "beta", "gamma")]
    live = await gateway.token(projects[0]["id"], max_requests=50)
    revoked = await gateway.token(projects[1]["id"])
    for token in (live, live, revoked):
        async with gateway.client.post("/v1/chat/completions", json=CHAT, headers=bearer(token)) as response:
            assert response.status == 200
    await gateway.manage("DELETE", f"/tokens/{revoked['id']}", expect=204)
    async with gateway.client.post("/v1/chat/completions", json=CHAT, headers=bearer(revoked)) as response:
        assert response.status == 401
    return {"live": live, "revoked": revoked}


@pytest.fixture
async def deployment(tmp_path: Path, make_gateway: Callable[..., Any]) -> AsyncIterator[tuple[Path, dict[str, Any]]]:
    """A SQLite gateway's database after some traffic, the gateway stopped (counters and events flushed)."""
    gateway: Gateway = await make_gateway(RATE_LIMIT_PER_MINUTE="0")
    tokens = await traffic(gateway)
    await gateway.close()
    yield gateway.settings.database_path, tokens


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{password}@{parts.hostname}:{parts.port}"))


# ---- db copy ----


async def test_a_copy_to_postgresql_holds_every_row_and_its_chain_verifies(
        postgres_url: str, deployment: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    database, _ = deployment
    password = urlsplit(postgres_url).password
    assert password
    source = sqlite_rows(database)
    assert all(source[table] for table in ORDERS), {table: len(rows) for table, rows in source.items()}

    copied = await cli(capsys, "db", "copy", "--from", f"sqlite:///{database}", "--to", postgres_url, "--json",
                       "--batch-size", "2")
    assert (copied.code, copied.err) == (0, ""), copied
    document = orjson.loads(copied.out)
    assert document["rows"] == {table: len(source[table]) for table in ORDERS}
    assert document["to"] == with_password(postgres_url, "***") and password not in copied.out
    assert await postgres_rows(postgres_url) == source

    gateway_env(monkeypatch, DATABASE_URL=postgres_url, AUDIT_LOG_FILE=str(database.parent / "audit.log"))
    for argv in (("audit", "verify", "--db"), ("audit", "verify")):  # the table, and the files up to its head
        verified = await cli(capsys, *argv)
        assert (verified.code, verified.err) == (0, ""), verified
        assert "OK" in verified.out and password not in verified.out

    # Copied once: a second copy into it is refused, and changes nothing.
    again = await cli(capsys, "db", "copy", "--from", f"sqlite:///{database}", "--to", postgres_url)
    line = one_line(again, 1, f"db copy: the target {with_password(postgres_url, '***')} is not empty (projects: 3, "
                              "tokens: 2, usage_daily: ", "copies only into an empty database, and changed nothing")
    assert again.out == "" and password not in line
    assert await postgres_rows(postgres_url) == source


async def test_a_copy_comes_back_to_sqlite_unchanged(postgres_url: str, tmp_path: Path,
                                                     deployment: tuple[Path, dict[str, Any]],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    database, _ = deployment
    there = await cli(capsys, "db", "copy", "--from", f"sqlite:///{database}", "--to", postgres_url)
    assert there.code == 0, there
    assert there.out.splitlines()[0] == f"copied {database} to {with_password(postgres_url, '***')}:"
    assert "audit_chain" in there.out and "llm-proxy audit verify --db" in there.out
    back = await cli(capsys, "db", "copy", "--from", postgres_url, "--to", f"sqlite:///{tmp_path}/back/copy.db")
    assert back.code == 0, back
    assert sqlite_rows(tmp_path / "back" / "copy.db") == sqlite_rows(database)


async def test_a_copy_that_fails_leaves_the_target_empty(postgres_url: str,
                                                         deployment: tuple[Path, dict[str, Any]],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Projects and tokens are in, audit events half in, when the target refuses a row: nothing stays."""
    database, _ = deployment
    store = PostgresStore(postgres_url)
    await store.open()
    try:
        await store.db.execute("ALTER TABLE audit_events ADD CONSTRAINT only_a_few CHECK (seq < 4)")
    finally:
        await store.close()
    failed = await cli(capsys, "db", "copy", "--from", f"sqlite:///{database}", "--to", postgres_url,
                       "--batch-size", "1")
    one_line(failed, 1, f"db copy from {database} to {with_password(postgres_url, '***')} failed, and the target "
                        "was left as it was: ", "only_a_few")
    assert await postgres_counts(postgres_url) == {"projects": 0, "tokens": 0, "usage_daily": 0, "audit_events": 0}


async def test_a_copy_refuses_what_it_cannot_use_and_never_shows_a_password(
        postgres_url: str, tmp_path: Path, deployment: tuple[Path, dict[str, Any]],
        capsys: pytest.CaptureFixture[str]) -> None:
    database, _ = deployment
    password = urlsplit(postgres_url).password
    assert password
    wrong = with_password(postgres_url, "Wr0ng-pa55")
    cases = [
        (("--from", "mysql://u:Wr0ng-pa55@h/d", "--to", postgres_url), 2, "--from: the scheme mysql:// is not"),
        (("--from", f"sqlite:///{database}", "--to", postgres_url, wrong), 2, "unrecognized arguments: postgresql://"),
        (("--from", f"sqlite:///{database}", "--to", postgres_url, "--batch-size", wrong), 2, "--batch-size"),
        (("--from", f"sqlite:///{database}", "--to", wrong), 1, "password authentication failed"),
        (("--from", f"sqlite:///{tmp_path}/none.db", "--to", postgres_url), 1, f"no database at {tmp_path}/none.db"),
        (("--from", postgres_url, "--to", f"sqlite:///{tmp_path}/x.db"), 1, "is not an llm-proxy database"),
    ]
    for argv, code, fragment in cases:
        result = await cli(capsys, "db", "copy", *argv)
        line = one_line(result, code, fragment)
        assert password not in line and "Wr0ng-pa55" not in line, line
        assert result.out == ""
    assert not (tmp_path / "none.db").exists()
    conn = await asyncpg.connect(postgres_url)
    try:  # the target was never written to: not even migrated
        assert await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'") == []
    finally:
        await conn.close()


async def test_a_copy_of_a_served_database_says_so(postgres_url: str, make_gateway: Callable[..., Any],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    gateway: Gateway = await make_gateway()
    await gateway.project("alpha")
    copied = await cli(capsys, "db", "copy", "--from", f"sqlite:///{gateway.settings.database_path}",
                       "--to", postgres_url)
    assert copied.code == 0, copied
    assert copied.err.startswith(f"llm-proxy: warning: {gateway.settings.database_path} is served by pid "), copied
    assert "stop it first" in copied.err
    assert (await postgres_counts(postgres_url))["projects"] == 1


# ---- db status, db migrate ----


@pytest.mark.parametrize("argv", [["db"], ["db", "status"], ["db", "migrate"], ["db", "copy"]])
async def test_help_on_every_level(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    result = await cli(capsys, *argv, "--help")
    assert result.code == 0 and result.out.startswith(f"usage: llm-proxy {' '.join(argv)}"), result
    assert result.err == ""


async def test_status_and_migrate_on_postgresql(postgres_url: str, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    password = urlsplit(postgres_url).password
    assert password
    shown = with_password(postgres_url, "***")
    gateway_env(monkeypatch, DATABASE_URL=postgres_url)

    fresh = await cli(capsys, "db", "status", "--json")
    assert fresh.code == 1, fresh  # pending migrations: what a deploy script checks for
    document = orjson.loads(fresh.out)
    assert document["backend"] == "postgresql" and document["database"] == shown
    assert (document["applied"], document["up_to_date"], document["served_by"]) == ([], False, None)
    assert [m["version"] for m in document["pending"]] == [1, 2, 3, 4, 5]
    assert [m["name"] for m in document["pending"]] == ["initial", "serving_owner", "audit_instances",
                                                        "admin_sessions", "admin_form_uses"]

    migrated = await cli(capsys, "db", "migrate")
    assert (migrated.code, migrated.err) == (0, "")
    assert migrated.out == (f"applied 5 migration(s) to {shown}: 1 initial, 2 serving_owner, 3 audit_instances, "
                            "4 admin_sessions, 5 admin_form_uses\n")
    again = await cli(capsys, "db", "migrate", "--json")
    assert orjson.loads(again.out) == {"database": shown, "applied": []}

    # While a gateway serves it: status names the owner; migrate has nothing to do and takes nothing.
    store = PostgresStore(postgres_url)
    await store.open()
    await store.claim("pid 7 on gw-1 since 2026-12-02T21:00:00Z")
    try:
        status = await cli(capsys, "db", "status")
        assert (status.code, status.err) == (0, ""), status
        lines = status.out.splitlines()
        assert lines[:4] == ["backend    postgresql", f"database   {shown}",
                             "served by  pid 7 on gw-1 since 2026-12-02T21:00:00Z", "schema     up to date (version 5)"]
        assert lines[5].split() == ["VERSION", "NAME", "APPLIED"]
        assert [line.split()[:2] for line in lines[6:]] == [["1", "initial"], ["2", "serving_owner"],
                                                            ["3", "audit_instances"], ["4", "admin_sessions"],
                                                            ["5", "admin_form_uses"]]
        assert all(line.split()[2].endswith("Z") for line in lines[6:])
        assert (await cli(capsys, "db", "migrate")).out == f"{shown} is up to date: nothing to apply\n"
        assert store.owner.held
    finally:
        await store.close()
    assert all(password not in text for text in (fresh.out, migrated.out, status.out))


async def test_status_and_migrate_on_sqlite(tmp_path: Path, make_gateway: Callable[..., Any],
                                            capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    database = tmp_path / "data" / "gw.db"
    gateway_env(monkeypatch, DATABASE_PATH=str(database))
    missing = await cli(capsys, "db", "status")
    assert missing.code == 1, missing
    assert "schema     no database yet: `llm-proxy db migrate` (or `serve`) creates it" in missing.out
    assert [line.split() for line in missing.out.splitlines()[-4:]] == [["1", "initial", "pending"],
                                                                         ["2", "audit_instances", "pending"],
                                                                         ["3", "admin_sessions", "pending"],
                                                                         ["4", "admin_form_uses", "pending"]]
    assert not database.exists()  # status creates nothing

    migrated = await cli(capsys, "db", "migrate")
    assert migrated.out == (f"applied 4 migration(s) to {database}: 1 initial, 2 audit_instances, 3 admin_sessions, "
                            "4 admin_form_uses\n")
    assert database.is_file()

    gateway: Gateway = await make_gateway(DATABASE_PATH=str(database))
    status = await cli(capsys, "db", "status", "--json")
    assert status.code == 0, status
    document = orjson.loads(status.out)
    assert document["served_by"].startswith("pid ") and document["up_to_date"] is True
    assert [(m["version"], m["name"]) for m in document["applied"]] == [(1, "initial"), (2, "audit_instances"),
                                                                        (3, "admin_sessions"), (4, "admin_form_uses")]
    await gateway.close()
    assert orjson.loads((await cli(capsys, "db", "status", "--json")).out)["served_by"] is None


async def test_status_of_a_database_migrated_by_a_newer_version_exits_1(
        postgres_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    store = PostgresStore(postgres_url)
    await store.open()
    try:
        await store.db.execute("INSERT INTO schema_migrations (version, applied_at)"
                               " VALUES (99, '2030-01-01T00:00:00Z')")
    finally:
        await store.close()
    gateway_env(monkeypatch, DATABASE_URL=postgres_url)
    status = await cli(capsys, "db", "status")
    assert status.code == 1 and "migrated by a newer llm-proxy (version 99 unknown here)" in status.out, status
    one_line(await cli(capsys, "db", "migrate"), 1, "newer than this llm-proxy knows")


async def test_status_names_database_url_when_it_cannot_be_reached(postgres_url: str,
                                                                   capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    gateway_env(monkeypatch, DATABASE_URL=with_password(postgres_url, "Wr0ng-pa55"))
    line = one_line(await cli(capsys, "db", "status"), 1, "DATABASE_URL: cannot use postgresql://llm:***@",
                    "password authentication failed")
    assert "Wr0ng-pa55" not in line


# ---- as an operator runs them: processes ----


def serve_command_env(tmp_path: Path, upstream_url: str, port: int, **values: str) -> dict[str, str]:
    return child_env(MANAGEMENT_TOKEN=MANAGEMENT_TOKEN, ENCRYPTION_KEY=ENCRYPTION_KEY, OPENAI_API_URL=upstream_url,
                     LISTEN_ADDR=f"127.0.0.1:{port}", DATABASE_PATH=str(tmp_path / "data" / "llm-proxy.db"),
                     AUDIT_LOG_FILE=str(tmp_path / "data" / "audit.log"), LOG_FILE=str(tmp_path / "gateway.log"),
                     RATE_LIMIT_PER_MINUTE="0", SHUTDOWN_GRACE="5s", **values)


async def serve_until_stopped(env: dict[str, str], port: int, tmp_path: Path,
                              work: Callable[[str], Any]) -> tuple[bytes, bytes]:
    """Run `llm-proxy serve`, run work(url) once it answers /health, stop it with SIGTERM; return its output."""
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "llm_proxy", "serve", env=env, cwd=tmp_path,
                                                   stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(400):
                try:
                    async with session.get(f"{url}/health") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    if process.returncode is not None:
                        break
                    await asyncio.sleep(0.05)
        assert process.returncode is None, await process.communicate()
        await work(url)
        process.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(process.communicate(), timeout=30)
        assert process.returncode == 0, err
        return out, err
    finally:
        if process.returncode is None:
            process.kill()  # only the process this test started
            await process.wait()


@pytest.mark.system
async def test_moving_a_sqlite_deployment_to_postgresql(
        tmp_path: Path, postgres_url: str, upstream: tuple[UpstreamState, TestServer]) -> None:
    """Serve on SQLite, stop, `db copy` to PostgreSQL, check it, serve on the copy: the old tokens work there."""
    _, server = upstream
    upstream_url = str(server.make_url("")).rstrip("/")
    password = urlsplit(postgres_url).password
    assert password
    management = {"Authorization": f"Bearer {MANAGEMENT_TOKEN}"}
    made: dict[str, Any] = {}

    async def use_sqlite(url: str) -> None:
        async with aiohttp.ClientSession(headers=management) as session:
            async with session.post(f"{url}/manage/projects", json={"name": "p", "api_key": UPSTREAM_KEY}) as answer:
                project = await answer.json()
            for name in ("live", "revoked"):
                async with session.post(f"{url}/manage/tokens", json={"project_id": project["id"]}) as answer:
                    made[name] = await answer.json()
            for name in ("live", "revoked"):
                async with session.post(f"{url}/v1/chat/completions", json=CHAT, headers=bearer(made[name])) as answer:
                    assert answer.status == 200
            async with session.delete(f"{url}/manage/tokens/{made['revoked']['id']}") as answer:
                assert answer.status == 204

    port = free_port()
    said = list(await serve_until_stopped(serve_command_env(tmp_path, upstream_url, port), port, tmp_path,
                                          use_sqlite))
    database = tmp_path / "data" / "llm-proxy.db"
    source = sqlite_rows(database)

    env = serve_command_env(tmp_path, upstream_url, port)
    copied = await run_process("db", "copy", "--from", f"sqlite:///{database}", "--to", postgres_url, env=env)
    assert (copied.code, copied.err) == (0, ""), copied
    assert copied.out.splitlines()[1:7] == ["TABLE         ROWS", "projects      1", "tokens        2",
                                             f"usage_daily   {len(source['usage_daily'])}",
                                             f"audit_events  {len(source['audit_events'])}",
                                             f"audit_chain   {len(source['audit_chain'])}"]
    assert await postgres_rows(postgres_url) == source

    on_copy = {**env, "DATABASE_URL": postgres_url}
    status = await run_process("db", "status", env=on_copy)
    assert status.code == 0 and "up to date (version 5)" in status.out, status
    for argv in (("audit", "verify", "--db"), ("audit", "verify")):
        verified = await run_process(*argv, env=on_copy)
        assert verified.code == 0 and "OK" in verified.out, verified
        said += [verified.out, verified.err]
    refused = await run_process("db", "copy", "--from", f"sqlite:///{database}", "--to", postgres_url, env=env)
    one_line(refused, 1, "is not empty")
    said += [copied.out, copied.err, status.out, status.err, refused.out, refused.err]

    async def use_copy(url: str) -> None:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/v1/chat/completions", json=CHAT, headers=bearer(made["live"])) as answer:
                assert answer.status == 200
            async with session.post(f"{url}/v1/chat/completions", json=CHAT,
                                    headers=bearer(made["revoked"])) as answer:
                assert answer.status == 401
                assert (await answer.json())["error"]["code"] == "token_revoked"
            async with session.get(f"{url}/manage/tokens/{made['live']['id']}", headers=management) as answer:
                assert (await answer.json())["request_count"] >= 1  # counted on SQLite, carried over

    port = free_port()
    said += list(await serve_until_stopped({**on_copy, "LISTEN_ADDR": f"127.0.0.1:{port}"}, port, tmp_path,
                                           use_copy))
    counted = await postgres_rows(postgres_url)
    live = [row for row in counted["tokens"] if row[0] == made["live"]["id"]]
    assert live and live[0][9] == 2  # request_count: one on SQLite, one on the copy
    said.append((tmp_path / "gateway.log").read_text())
    assert all(password not in (text.decode() if isinstance(text, bytes) else text) for text in said)


async def test_a_copy_takes_a_url_from_a_variable_keeping_its_password_off_the_command_line(
        postgres_url: str, deployment: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    database, _ = deployment
    monkeypatch.setenv("COPY_TARGET_URL", postgres_url)
    copied = await cli(capsys, "db", "copy", "--from", f"sqlite:///{database}", "--to", "env:COPY_TARGET_URL")
    assert (copied.code, copied.err) == (0, ""), copied
    assert await postgres_rows(postgres_url) == sqlite_rows(database)
    missing = await cli(capsys, "db", "copy", "--from", "env:NOT_SET_ANYWHERE", "--to", "env:COPY_TARGET_URL")
    assert missing.code == 2 and "--from env:NOT_SET_ANYWHERE: no variable NOT_SET_ANYWHERE" in missing.err
