"""The gateway on PostgreSQL, end to end: real HTTP, the real openai SDK, a real PostgreSQL server.

Each test asks for postgres_url before make_gateway: fixtures are torn down in reverse, so the
gateways close (flushing counters and audit events) before the test's database is dropped.

The same gateway as everywhere else, started with DATABASE_URL: projects, tokens, usage and audit
events land in PostgreSQL (and no SQLite file is made), and the operator's commands (`audit verify`)
read them there. The last tests run `llm-proxy serve` as its own process and look for the
database's password in everything it says.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import openai
import orjson
import pytest
from aiohttp.test_utils import TestServer

from llm_proxy.app import AUDIT, TOKEN_CACHE
from llm_proxy.ops.cli import main
from llm_proxy.settings import VARIABLES
from tests.fakes import (
    ENCRYPTION_KEY,
    MANAGEMENT_TOKEN,
    UPSTREAM_KEY,
    Gateway,
    UpstreamState,
    bearer,
    free_port,
    serve_env,
    wait_healthy,
)

asyncpg = pytest.importorskip("asyncpg")  # the `postgres` extra (under CI a skip fails the run)

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def select(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Read PostgreSQL through a connection of the test's own, not the gateway's."""
    conn = await asyncpg.connect(url)
    try:
        return [tuple(row) for row in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


async def everything_stored(url: str) -> str:
    """Every row of every table, as text: what a secret scan reads."""
    tables = [name for (name,) in await select(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
    assert {"projects", "tokens", "audit_events", "audit_chain", "usage_daily", "schema_migrations"} <= set(tables)
    rows = []
    for table in tables:
        rows += [text for (text,) in await select(url, f'SELECT row_to_json(t)::text FROM "{table}" t')]
    return "\n".join(rows)


@pytest.fixture
def cli_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[Gateway], None]:
    """Give the CLI (run in this process, in a thread) the configuration of a gateway: its database and files."""
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def use(gateway: Gateway) -> None:
        settings = gateway.settings
        assert settings.audit_log_file is not None
        for name, value in (("MANAGEMENT_TOKEN", MANAGEMENT_TOKEN), ("ENCRYPTION_KEY", ENCRYPTION_KEY),
                            ("DATABASE_URL", settings.database_url),
                            ("AUDIT_LOG_FILE", str(settings.audit_log_file))):
            monkeypatch.setenv(name, value)
    return use


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the CLI in a worker thread (it runs its own event loop), so this test's loop keeps serving."""
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_the_gateway_keeps_projects_tokens_usage_and_audit_in_postgresql(
        postgres_url: str, make_gateway: Callable[..., Any], tmp_path: Path,
        cli_environment: Callable[[Gateway], None], capsys: pytest.CaptureFixture[str]) -> None:
    gateway: Gateway = await make_gateway(DATABASE_URL=postgres_url, RATE_LIMIT_PER_MINUTE="0")
    cli_environment(gateway)
    project = await gateway.project("alpha")
    token = await gateway.token(project["id"], max_requests=10)

    answer = await gateway.openai(token["token"]).chat.completions.create(**CHAT)
    assert answer.choices[0].message.content == "Hello there"

    # Usage: counted in memory, visible in PostgreSQL once flushed.
    await gateway.app[TOKEN_CACHE].flush()
    assert await select(postgres_url, "SELECT request_count, prompt_tokens, completion_tokens, total_tokens"
                        " FROM tokens WHERE id = $1", token["id"]) == [(1, 5, 2, 7)]
    usage = await gateway.manage("GET", f"/projects/{project['id']}/usage", expect=200)
    assert [(day["requests"], day["total_tokens"]) for day in usage["data"]] == [(1, 7)]
    stored = await gateway.manage("GET", f"/tokens/{token['id']}", expect=200)
    assert (stored["request_count"], stored["total_tokens"]) == (1, 7)

    # A duplicate name: 409, from PostgreSQL's unique constraint.
    duplicate = await gateway.manage("POST", "/projects", {"name": "alpha", "api_key": UPSTREAM_KEY}, expect=409)
    assert (duplicate["error"]["code"], duplicate["error"]["param"]) == ("conflict", "name")

    # Revoked: the very next request is refused.
    await gateway.manage("DELETE", f"/tokens/{token['id']}", expect=204)
    with pytest.raises(openai.AuthenticationError) as refused:
        await gateway.openai(token["token"]).chat.completions.create(**CHAT)
    assert refused.value.status_code == 401 and refused.value.code == "token_revoked"

    # The audit trail: in the table, listed by the API, and its chain verifies, table and file.
    await gateway.app[AUDIT].flush()
    listed = await gateway.manage("GET", "/audit?limit=100", expect=200)
    actions = [event["action"] for event in listed["data"]]
    for action in ("project.create", "token.create", "token.access", "token.revoke", "token.validate"):
        assert action in actions, actions
    seqs = [event["seq"] for event in listed["data"]]
    assert seqs == sorted(seqs, reverse=True)
    in_table = await select(postgres_url, "SELECT seq FROM audit_events ORDER BY seq DESC")
    assert [seq for (seq,) in in_table][:len(seqs)] == seqs
    code, out, err = await cli(capsys, "audit", "verify", "--db")
    assert (code, err) == (0, "") and out.startswith("audit_events: OK"), (out, err)
    await gateway.app[AUDIT].flush()
    code, out, err = await cli(capsys, "audit", "verify")
    assert (code, err) == (0, "") and "checked up to the database's chain head" in out, (out, err)

    # Nothing went to SQLite; no secret went to PostgreSQL.
    assert not gateway.settings.database_path.exists()
    everything = await everything_stored(postgres_url)
    for secret in (token["token"], UPSTREAM_KEY, MANAGEMENT_TOKEN, ENCRYPTION_KEY):
        assert secret not in everything
    assert token["token"] not in everything and len(everything) > 1000


async def test_a_restarted_gateway_continues_from_postgresql(
        postgres_url: str, make_gateway: Callable[..., Any], cli_environment: Callable[[Gateway], None],
        capsys: pytest.CaptureFixture[str]) -> None:
    """Tokens, revocations, counters and the audit chain survive a restart: nothing lived only in memory."""
    first: Gateway = await make_gateway(DATABASE_URL=postgres_url, RATE_LIMIT_PER_MINUTE="0")
    live, revoked = await first.token(), await first.token()
    async with first.client.post("/v1/chat/completions", json=CHAT, headers=bearer(live)) as response:
        assert response.status == 200
    await first.manage("DELETE", f"/tokens/{revoked['id']}", expect=204)
    await first.close()  # one serving process per database
    head = await select(postgres_url, "SELECT seq FROM audit_chain")

    second: Gateway = await make_gateway(DATABASE_URL=postgres_url, RATE_LIMIT_PER_MINUTE="0")
    cli_environment(second)
    async with second.client.post("/v1/chat/completions", json=CHAT, headers=bearer(live)) as response:
        assert response.status == 200
    async with second.client.post("/v1/chat/completions", json=CHAT, headers=bearer(revoked)) as response:
        assert response.status == 401 and (await response.json())["error"]["code"] == "token_revoked"
    await second.app[TOKEN_CACHE].flush()
    assert (await second.manage("GET", f"/tokens/{live['id']}", expect=200))["request_count"] == 2
    await second.app[AUDIT].flush()
    assert (await select(postgres_url, "SELECT seq FROM audit_chain"))[0][0] > head[0][0]
    code, out, err = await cli(capsys, "audit", "verify", "--db")
    assert code == 0 and out.startswith("audit_events: OK"), (out, err)


async def test_ready_answers_from_postgresql(postgres_url: str, make_gateway: Callable[..., Any]) -> None:
    gateway: Gateway = await make_gateway(DATABASE_URL=postgres_url)
    async with gateway.client.get("/ready") as response:
        assert response.status == 200


# ---- `llm-proxy serve` as a process ----


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{password}@{parts.hostname}:{parts.port}"))


def with_port(url: str, port: int) -> str:
    """The URL of a PostgreSQL that is not there: nothing listens on that port."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{parts.password}@{parts.hostname}:{port}"))


@pytest.mark.system
async def test_serve_on_postgresql_never_shows_the_database_password(
        tmp_path: Path, postgres_url: str, upstream: tuple[UpstreamState, TestServer]) -> None:
    """A real `llm-proxy serve` with DATABASE_URL: it serves, and neither its log, its stderr, its audit file
    nor any answer holds the password; a wrong password and an unreachable server stop it with one line
    naming DATABASE_URL, the password masked."""
    _, server = upstream
    password = urlsplit(postgres_url).password
    assert password
    env = serve_env(tmp_path, DATABASE_URL=postgres_url, OPENAI_API_URL=str(server.make_url("")).rstrip("/"),
                    LOG_FILE=str(tmp_path / "gateway.log"), LOG_LEVEL="debug", RATE_LIMIT_PER_MINUTE="0")
    port = int(env["LISTEN_ADDR"].rpartition(":")[2])
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "llm_proxy", "serve", env=env, cwd=tmp_path,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    answers: list[bytes] = []
    try:
        await wait_healthy(port, process)
        assert process.returncode is None, await process.communicate()
        url = f"http://127.0.0.1:{port}"
        management = {"Authorization": f"Bearer {MANAGEMENT_TOKEN}"}
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/manage/projects", headers=management,
                                    json={"name": "p", "api_key": UPSTREAM_KEY}) as response:
                assert response.status == 201
                project = orjson.loads(await response.read())
            async with session.post(f"{url}/manage/tokens", headers=management,
                                    json={"project_id": project["id"]}) as response:
                assert response.status == 201
                token = orjson.loads(await response.read())
            async with session.post(f"{url}/manage/projects", headers=management,
                                    json={"name": "p", "api_key": UPSTREAM_KEY}) as response:
                assert response.status == 409
                answers.append(await response.read())
            for path in ("/ready", "/health", "/manage/audit"):
                async with session.get(f"{url}{path}", headers=management) as response:
                    assert response.status == 200, path
                    answers.append(await response.read())
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=token["token"], max_retries=0) as sdk:
            answer = await sdk.chat.completions.create(**CHAT)
        assert answer.choices[0].message.content == "Hello there"
        process.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    finally:
        if process.returncode is None:
            process.kill()  # only the process this test started
            await process.wait()
    assert process.returncode == 0, err
    assert await select(postgres_url, "SELECT request_count FROM tokens WHERE id = $1", token["id"]) == [(1,)]
    log = (tmp_path / "gateway.log").read_text()
    assert "listening on" in log
    said = [out.decode(), err.decode(), log, (tmp_path / "audit.log").read_text(), *(a.decode() for a in answers)]
    assert all(password not in text for text in said)

    for wrong_url, reason in ((with_password(postgres_url, "Wr0ng-pa55"), "password authentication failed"),
                              (with_port(postgres_url, free_port()), "Connection refused")):
        failed = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llm_proxy", "serve", env={**env, "DATABASE_URL": wrong_url}, cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(failed.communicate(), timeout=60)
        lines = err.decode().strip().splitlines()
        assert failed.returncode == 1 and len(lines) == 1, (failed.returncode, err)
        assert lines[0].startswith("llm-proxy: DATABASE_URL: cannot use postgresql://llm:***@127.0.0.1:")
        assert reason in lines[0]
        said = [out.decode(), err.decode(), (tmp_path / "gateway.log").read_text()]
        assert all("Wr0ng-pa55" not in text and password not in text for text in said)
