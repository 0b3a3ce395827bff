"""Three `llm-proxy serve` processes on one PostgreSQL and one Redis, driven through the real openai SDK:
every promise of one process holds across all three (SPEC §7).

Each sub-check sends from an address of its own (X-Forwarded-For from a trusted proxy), so the refusals
one provokes never count against another's failed-authentication allowance.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp.test_utils import TestServer

asyncpg = pytest.importorskip("asyncpg")  # the `postgres` extra (under CI a skip fails the run)
redis_asyncio = pytest.importorskip("redis.asyncio")  # the `redis` extra

from tests.fakes import (  # noqa: E402
    ENCRYPTION_KEY,
    MANAGEMENT_TOKEN,
    REPO,
    UPSTREAM_KEY,
    UpstreamState,
    free_port,
)

pytestmark = pytest.mark.system

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}  # the fake answers 7 tokens
AUTH = {"Authorization": f"Bearer {MANAGEMENT_TOKEN}"}


class Node:
    """One gateway process of the cluster."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, url: str, log: Path) -> None:
        self.name, self.process, self.url, self.log = name, process, url, log
        self._sdks: list[openai.AsyncOpenAI] = []

    def sdk(self, token: dict[str, Any], client_ip: str) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=token["token"], max_retries=0, timeout=10,
                                    default_headers={"X-Forwarded-For": client_ip})
        self._sdks.append(client)
        return client

    async def close(self) -> None:
        for client in self._sdks:
            await client.close()


@asynccontextmanager
async def node(tmp_path: Path, name: str, env: dict[str, str]) -> AsyncIterator[Node]:
    port = free_port()
    log = tmp_path / f"{name}.log"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llm_proxy", "serve", cwd=tmp_path,
        env={**env, "LISTEN_ADDR": f"127.0.0.1:{port}", "INSTANCE_ID": name, "LOG_FILE": str(log),
             "AUDIT_LOG_FILE": str(tmp_path / f"{name}-audit.log")},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    served = Node(name, process, f"http://127.0.0.1:{port}", log)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(300):
                if process.returncode is not None:
                    break
                try:
                    async with session.get(f"{served.url}/ready") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)
            else:
                pytest.fail(f"{name} did not become ready: {log.read_text() if log.exists() else ''}")
        assert process.returncode is None, log.read_text()
        yield served
    finally:
        await served.close()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def manage(session: aiohttp.ClientSession, gateway: Node, method: str, path: str, body: Any = None,
                 expect: int = 200) -> Any:
    async with session.request(method, f"{gateway.url}/manage{path}", json=body, headers=AUTH) as response:
        assert response.status == expect, (response.status, await response.text())
        return await response.json() if response.status != 204 else None


async def outcome(call: Any) -> str:
    """What a client saw: ok, or the error's code."""
    try:
        await call
    except openai.APIStatusError as exc:
        return str(exc.code)
    return "ok"


async def shared_total(redis_url: str, token_id: str) -> int:
    client = redis_asyncio.from_url(redis_url)
    try:
        return int(await client.hget(f"llm-proxy:usage:{token_id}", "total") or 0)
    finally:
        await client.aclose()


async def test_three_gateways_on_one_postgresql_and_one_redis_keep_every_promise(
        tmp_path: Path, postgres_url: str, redis_url: str, upstream: tuple[UpstreamState, TestServer]) -> None:
    _, upstream_server = upstream
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO),
           "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN, "ENCRYPTION_KEY": ENCRYPTION_KEY,
           "OPENAI_API_URL": str(upstream_server.make_url("")).rstrip("/"), "DATABASE_URL": postgres_url,
           "REDIS_URL": redis_url, "RATE_LIMIT_PER_MINUTE": "0", "IP_RATE_LIMIT": "20",
           "TRUSTED_PROXIES": "127.0.0.1/32", "SHUTDOWN_GRACE": "5s"}
    served: Counter[str] = Counter()  # token id -> answers served

    async with AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(node(tmp_path, f"gw-{n}", env)) for n in (1, 2, 3)]
        first, second, third = nodes
        session = await stack.enter_async_context(aiohttp.ClientSession())
        project = await manage(session, first, "POST", "/projects", {"name": "cluster", "api_key": UPSTREAM_KEY},
                               expect=201)

        async def token(**limits: Any) -> dict[str, Any]:
            created: dict[str, Any] = await manage(session, first, "POST", "/tokens",
                                                   {"project_id": project["id"], **limits}, expect=201)
            return created

        async def ask(gateway: Node, issued: dict[str, Any], client_ip: str) -> str:
            seen = await outcome(gateway.sdk(issued, client_ip).chat.completions.create(**CHAT))
            if seen == "ok":
                served[issued["id"]] += 1
            return seen

        # A token created on one gateway works on the others.
        everywhere = await token()
        assert [await ask(gateway, everywhere, "198.51.100.1") for gateway in nodes] == ["ok"] * 3

        # Revoked on one, refused by all within 1 s (each has it cached: it was used on each just now).
        await manage(session, first, "DELETE", f"/tokens/{everywhere['id']}", expect=204)
        revoked_at = time.monotonic()
        propagation = []
        for gateway in (second, third):
            while (seen := await ask(gateway, everywhere, "198.51.100.2")) == "ok":
                assert time.monotonic() - revoked_at < 2.0, f"{gateway.name} still serves a revoked token"
            assert seen == "token_revoked"
            propagation.append(time.monotonic() - revoked_at)
        assert max(propagation) < 1.0, propagation

        # max_requests=25 under 60 concurrent requests spread over the three: exactly 25 served.
        quota = await token(max_requests=25)
        outcomes = await asyncio.gather(*(ask(nodes[n % 3], quota, "198.51.100.3") for n in range(60)))
        assert Counter(outcomes) == {"ok": 25, "quota_exceeded": 35}

        # One per-token rate for all three: 6 a minute, then refused wherever asked.
        rated = await token(rate_limit_per_minute=6)
        outcomes = [await ask(nodes[n % 3], rated, "198.51.100.4") for n in range(9)]
        assert outcomes == ["ok"] * 6 + ["rate_limited"] * 3

        # One budget: 20 tokens, 7 per answer — the fourth request finds 21 spent, whichever gateway it meets.
        budget = await token(max_tokens_total=20)
        for n in range(3):
            assert await ask(nodes[n], budget, "198.51.100.5") == "ok"
            for _ in range(250):  # usage reaches the shared counters just after the answer
                if await shared_total(redis_url, budget["id"]) == 7 * (n + 1):
                    break
                await asyncio.sleep(0.02)
        assert [await ask(gateway, budget, "198.51.100.5") for gateway in nodes] == ["budget_exceeded"] * 3

        # One failed-authentication allowance per IP: 20 failures spread over the three, then refused
        # everywhere, a valid token included.
        impostor = {"token": "tok-" + "z" * 40, "id": "impostor"}
        failures = [await ask(nodes[n % 3], impostor, "203.0.113.9") for n in range(20)]
        assert failures == ["invalid_token"] * 20
        valid = await token()
        assert [await ask(gateway, valid, "203.0.113.9") for gateway in nodes] == ["rate_limited"] * 3
        assert await ask(third, valid, "198.51.100.6") == "ok"  # another address is not blocked

        # A clean shutdown of all three writes what each counted.
        for gateway in nodes:
            gateway.process.send_signal(signal.SIGTERM)
        for gateway in nodes:
            assert await asyncio.wait_for(gateway.process.wait(), timeout=30) == 0, gateway.log.read_text()

    conn = await asyncpg.connect(postgres_url)
    try:
        stored = {row["id"]: row["request_count"] for row in await conn.fetch("SELECT id, request_count FROM tokens")}
        daily = await conn.fetchval("SELECT sum(requests) FROM usage_daily WHERE project_id = $1", project["id"])
        tables = [name for (name,) in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        in_postgres = "\n".join([text for table in tables
                                 for (text,) in await conn.fetch(f'SELECT row_to_json(t)::text FROM "{table}" t')])
    finally:
        await conn.close()
    client = redis_asyncio.from_url(redis_url)
    try:
        in_redis = repr([(key, await client.dump(key)) async for key in client.scan_iter("*")])
    finally:
        await client.aclose()
    # Neither server holds a plaintext token, the upstream key, the management token or the encryption key.
    for secret in (everywhere["token"], quota["token"], valid["token"], impostor["token"], UPSTREAM_KEY,
                   MANAGEMENT_TOKEN, ENCRYPTION_KEY):
        assert secret not in in_postgres and secret not in in_redis
    assert quota["id"] in in_postgres and quota["id"] in in_redis  # the scans did read the data
    assert {token_id: count for token_id, count in stored.items() if count} == \
        {token_id: count for token_id, count in served.items() if count}
    assert daily == sum(served.values())

    # The audit trail in PostgreSQL verifies: one chain per gateway, each whole, all three written at once.
    verify = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llm_proxy", "audit", "verify", "--db", "--json", cwd=tmp_path,
        env={**env, "AUDIT_LOG_FILE": ""}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(verify.communicate(), timeout=60)
    assert verify.returncode == 0, (out, err)
    chains = orjson.loads(out)["db"]["chains"]
    assert {"gw-1", "gw-2", "gw-3"} <= set(chains)
    assert all(chains[name]["ok"] and chains[name]["first_seq"] == 1 and chains[name]["events"] > 5
               for name in ("gw-1", "gw-2", "gw-3")), chains
    # No password of either server in any log line.
    for name in ("gw-1", "gw-2", "gw-3"):
        text = (tmp_path / f"{name}.log").read_text()
        assert "listening on" in text
        for url in (postgres_url, redis_url):
            password = url.split("@")[0].rsplit(":", 1)[-1]
            assert password and password not in text
