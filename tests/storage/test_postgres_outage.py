"""PostgreSQL stopped under traffic and started again (SPEC §7, faults): warm tokens are still served,
management answers 503, /ready answers 503, and the audit events and usage of the outage are written
once the database is back — none lost, the chain intact. The PostgreSQL and the Redis are real."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

asyncpg = pytest.importorskip("asyncpg")  # the `postgres` extra (under CI a skip fails the run)
pytest.importorskip("redis")

from llm_proxy.app import AUDIT, TOKEN_CACHE  # noqa: E402
from tests.fakes import Gateway, bearer  # noqa: E402
from tests.servers import PostgresProcess, restartable_postgres  # noqa: E402

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def postgres() -> Iterator[PostgresProcess]:
    with restartable_postgres() as server:
        server.start()
        yield server


async def status(gateway: Gateway, method: str, path: str, **kwargs: Any) -> int:
    response = await gateway.client.request(method, path, **kwargs)
    await response.read()
    return response.status


async def stored(url: str, sql: str) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(url)
    try:
        return [tuple(row) for row in await conn.fetch(sql)]
    finally:
        await conn.close()


async def test_an_outage_serves_warm_tokens_refuses_management_and_loses_nothing(
        postgres: PostgresProcess, redis_url: str, make_gateway: Callable[..., Any]) -> None:
    url = postgres.server.url
    gateway: Gateway = await make_gateway(DATABASE_URL=url, REDIS_URL=redis_url, RATE_LIMIT_PER_MINUTE="0")
    token = await gateway.token(max_requests=100)
    assert await status(gateway, "POST", "/v1/chat/completions", json=CHAT, headers=bearer(token)) == 200
    await gateway.app[AUDIT].flush()
    await gateway.app[TOKEN_CACHE].flush()

    postgres.stop()
    # The warm token is served from memory; its limits are in Redis.
    for _ in range(5):
        assert await status(gateway, "POST", "/v1/chat/completions", json=CHAT, headers=bearer(token)) == 200
    assert await status(gateway, "GET", "/ready") == 503
    assert await status(gateway, "POST", "/manage/projects", json={"name": "x", "api_key": "sk-" + "k" * 30},
                        headers=gateway.auth) == 503
    assert await status(gateway, "GET", "/health") == 200  # alive, only not ready

    postgres.start()
    for _ in range(200):
        if await status(gateway, "GET", "/ready") == 200:
            break
        await asyncio.sleep(0.05)
    assert await status(gateway, "GET", "/ready") == 200
    # What was counted and audited during the outage reaches the database.
    for _ in range(200):
        rows = await stored(url, f"SELECT request_count FROM tokens WHERE id = '{token['id']}'")
        events = await stored(url, "SELECT details FROM audit_events WHERE action = 'token.access'")
        if rows == [(6,)] and len(events) == 6:
            break
        await asyncio.sleep(0.05)
    assert rows == [(6,)]
    assert len(events) == 6 and all(orjson.loads(details)["status"] == 200 for (details,) in events)
    seqs = [seq for (seq,) in await stored(url, "SELECT seq FROM audit_events ORDER BY seq")]
    assert seqs == list(range(1, len(seqs) + 1))  # no gap, nothing twice
    assert await status(gateway, "POST", "/manage/projects", json={"name": "after", "api_key": "sk-" + "k" * 30},
                        headers=gateway.auth) == 201
