"""Gateways sharing one Redis (REDIS_URL): one quota, budget, rate and failure count for all of them, usage
that adds up in the database, and what proxying does while Redis is down (REDIS_FAILURE_MODE), recovery
included. Two gateways in this process on one SQLite file stand for two processes; the Redis is real."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import openai
import orjson
import pytest

pytest.importorskip("redis", reason="the redis extra is not installed (`make test` installs it)")

from redis.asyncio import Redis

from llm_proxy.app import AUDIT, TOKEN_CACHE
from tests.fakes import ENCRYPTION_KEY, MANAGEMENT_TOKEN, UPSTREAM_KEY, Gateway, bearer, scalar
from tests.servers import RedisProcess, restartable_redis

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}  # the fake answers 7 tokens


async def chat(gateway: Gateway, token: dict[str, Any]) -> tuple[int, str | None]:
    """One chat completion: its status and, when refused, the error's code."""
    response = await gateway.client.post("/v1/chat/completions", json=CHAT, headers=bearer(token))
    body = orjson.loads(await response.read())
    return response.status, None if response.status == 200 else body["error"]["code"]


async def pair(make_gateway: Callable[..., Any], redis_url: str, **settings: str) -> tuple[Gateway, Gateway]:
    """Two gateways on one database and one Redis."""
    first = await make_gateway(REDIS_URL=redis_url, RATE_LIMIT_PER_MINUTE="0", **settings)
    second = await make_gateway(REDIS_URL=redis_url, RATE_LIMIT_PER_MINUTE="0", **settings)
    return first, second


async def shared_counters(redis_url: str, token_id: str) -> dict[str, int]:
    client = Redis.from_url(redis_url)
    try:
        stored = await client.hgetall(f"llm-proxy:usage:{token_id}")
    finally:
        await client.aclose()
    return {key.decode(): int(value) for key, value in stored.items()}


async def until_spent(redis_url: str, token_id: str, total: int) -> None:
    """Wait (bounded) until the token's shared usage reaches `total`: usage follows the answers in batches."""
    for _ in range(250):
        if (await shared_counters(redis_url, token_id)).get("total", 0) >= total:
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"the shared usage never reached {total}")


async def audit_actions(gateway: Gateway) -> list[str]:
    await gateway.app[AUDIT].flush()
    path = gateway.settings.audit_log_file
    assert path is not None
    return [orjson.loads(line)["action"] for line in path.read_bytes().splitlines()]


async def test_max_requests_is_one_quota_across_gateways(make_gateway: Callable[..., Any], redis_url: str) -> None:
    first, second = await pair(make_gateway, redis_url)
    token = await first.token(max_requests=5)
    outcomes = await asyncio.gather(*(chat(gateway, token) for _ in range(8) for gateway in (first, second)))
    assert Counter(outcomes) == {(200, None): 5, (429, "quota_exceeded"): 11}


async def test_a_budget_spent_on_one_gateway_refuses_on_the_other(make_gateway: Callable[..., Any],
                                                                  redis_url: str) -> None:
    first, second = await pair(make_gateway, redis_url)
    token = await first.token(max_tokens_total=10)
    assert await chat(first, token) == (200, None)
    holder: dict[str, int] = {}

    async def spent() -> int:
        holder.update(await shared_counters(redis_url, token["id"]))
        return holder.get("total", 0)

    # Usage is added to the shared counters just after the answer, off the request's path.
    for _ in range(250):
        if await spent() == 7:
            break
        await asyncio.sleep(0.02)
    assert holder["total"] == 7
    assert await chat(second, token) == (200, None)  # 7 < 10: admitted, and now 14 are spent
    for _ in range(250):
        if await spent() == 14:
            break
        await asyncio.sleep(0.02)
    assert await chat(first, token) == (429, "budget_exceeded")
    assert await chat(second, token) == (429, "budget_exceeded")


async def test_the_token_rate_and_the_global_rate_are_one_allowance(make_gateway: Callable[..., Any],
                                                                    redis_url: str) -> None:
    first, second = await pair(make_gateway, redis_url)
    token = await first.token(rate_limit_per_minute=3)
    outcomes = [await chat(gateway, token) for gateway in (first, second, first, second, first)]
    assert outcomes == [(200, None)] * 3 + [(429, "rate_limited")] * 2

    await first.close()
    await second.close()
    first, second = await pair(make_gateway, redis_url, GLOBAL_RATE_LIMIT="4")
    project = await first.project("global")
    tokens = [await first.token(project["id"]) for _ in range(3)]
    outcomes = [await chat(gateway, tokens[n % 3]) for n, gateway in enumerate((first, second) * 3)]
    assert outcomes == [(200, None)] * 4 + [(429, "rate_limited")] * 2


async def test_failed_authentications_are_counted_across_gateways(make_gateway: Callable[..., Any],
                                                                  redis_url: str) -> None:
    first, second = await pair(make_gateway, redis_url, IP_RATE_LIMIT="3")
    token = await first.token()
    for gateway in (first, second, first):
        assert await chat(gateway, {"token": "tok-" + "x" * 40}) == (401, "invalid_token")
    # The fourth failure would be one too many: the IP is blocked on both, a valid token included.
    assert await chat(second, token) == (429, "rate_limited")
    assert await chat(first, token) == (429, "rate_limited")


async def test_usage_in_the_database_is_the_sum_of_what_each_gateway_served(make_gateway: Callable[..., Any],
                                                                            redis_url: str) -> None:
    first, second = await pair(make_gateway, redis_url)
    token = await first.token()
    for gateway in (first, second, second, first, second):
        assert await chat(gateway, token) == (200, None)
    for gateway in (first, second):
        await gateway.app[TOKEN_CACHE].flush()
    database = first.settings.database_path
    assert scalar(database, "SELECT request_count || ' ' || total_tokens FROM tokens WHERE id = ?",
                  (token["id"],)) == "5 35"
    assert scalar(database, "SELECT requests || ' ' || total_tokens FROM usage_daily") == "5 35"
    # Each gateway flushed only what it counted itself: a second flush adds nothing.
    for gateway in (second, first):
        await gateway.app[TOKEN_CACHE].flush()
    assert scalar(database, "SELECT request_count FROM tokens WHERE id = ?", (token["id"],)) == 5


async def test_nothing_secret_is_kept_in_redis(make_gateway: Callable[..., Any], redis_url: str) -> None:
    first, second = await pair(make_gateway, redis_url, IP_RATE_LIMIT="5")
    token = await first.token(max_requests=10, max_tokens_total=1000, rate_limit_per_minute=100)
    for gateway in (first, second):
        assert await chat(gateway, token) == (200, None)
        assert await chat(gateway, {"token": "tok-" + "y" * 40}) == (401, "invalid_token")
    client = Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter("*")]
        stored = b"\n".join([key + b" " + orjson.dumps(await _value(client, key)) for key in keys])
    finally:
        await client.aclose()
    assert any(b"usage:" + token["id"].encode() in key for key in keys)
    for secret in (token["token"], "tok-" + "y" * 40, UPSTREAM_KEY, MANAGEMENT_TOKEN, ENCRYPTION_KEY):
        assert secret.encode() not in stored


async def _value(client: Redis, key: bytes) -> Any:
    kind = (await client.type(key)).decode()
    if kind == "hash":
        return {k.decode(): v.decode() for k, v in (await client.hgetall(key)).items()}
    if kind == "string":
        return (await client.get(key) or b"").decode()
    return kind


# ---- Redis stopped and started again ----


@pytest.fixture
def redis() -> Iterator[RedisProcess]:
    with restartable_redis() as server:
        server.start()
        yield server


@pytest.mark.parametrize("mode", ["closed", "open"])
async def test_an_outage_refuses_or_serves_by_mode_and_recovers_by_itself(
        make_gateway: Callable[..., Any], redis: RedisProcess, mode: str) -> None:
    first, second = await pair(make_gateway, redis.server.url, REDIS_FAILURE_MODE=mode)
    token = await first.token(max_requests=100)
    assert await chat(first, token) == (200, None)

    redis.stop()
    if mode == "closed":
        response = await first.client.post("/v1/chat/completions", json=CHAT, headers=bearer(token))
        body = orjson.loads(await response.read())
        assert (response.status, body["error"]["code"]) == (503, "shared_state_unavailable")
        assert response.headers["Retry-After"] == "1"
        with pytest.raises(openai.InternalServerError):
            await second.openai(token["token"]).chat.completions.create(**CHAT)
    else:
        assert [await chat(gateway, token) for gateway in (first, second, first)] == [(200, None)] * 3
    # Management does not need Redis; the failure throttle falls back to each process's own count.
    assert (await first.project("during-the-outage"))["name"] == "during-the-outage"
    metrics = await (await first.client.get("/metrics", headers=first.auth)).text()
    assert "llm_proxy_shared_state_available 0.0" in metrics
    assert "llm_proxy_shared_state_errors_total 0.0" not in metrics

    redis.start()  # empty: the counters are seeded again from what each process last saw
    for gateway in (first, second):  # each notices by itself within its probe's interval
        for _ in range(100):
            metrics = await (await gateway.client.get("/metrics", headers=gateway.auth)).text()
            if "llm_proxy_shared_state_available 1.0" in metrics:
                break
            await asyncio.sleep(0.05)
        assert "llm_proxy_shared_state_available 1.0" in metrics
    assert [await chat(gateway, token) for gateway in (first, second)] == [(200, None)] * 2
    assert await shared_counters(redis.server.url, token["id"]) != {}  # counting in Redis again
    await first.app[AUDIT].flush()
    actions = await audit_actions(second)  # both write one file here
    # One episode each: degraded once, recovered once.
    assert actions.count("system.degraded") == 2 and actions.count("system.recovered") == 2, actions


async def test_in_open_mode_a_revocation_reaches_the_other_gateway_within_a_second(
        make_gateway: Callable[..., Any], redis: RedisProcess) -> None:
    first, second = await pair(make_gateway, redis.server.url, REDIS_FAILURE_MODE="open")
    token = await first.token()
    assert await chat(second, token) == (200, None)  # cached by the second gateway
    redis.stop()
    assert await chat(second, token) == (200, None)  # the outage is noticed; tokens are now re-read
    await first.manage("DELETE", f"/tokens/{token['id']}", expect=204)
    started = asyncio.get_running_loop().time()
    refused: list[tuple[int, str | None]] = []

    async def refused_on_second() -> bool:
        refused.append(await chat(second, token))
        return refused[-1] == (401, "token_revoked")

    while not await refused_on_second():
        assert asyncio.get_running_loop().time() - started < 1.5, refused
        await asyncio.sleep(0.05)
    assert asyncio.get_running_loop().time() - started <= 1.5


async def test_a_revocation_on_one_gateway_stops_the_token_on_the_other_at_once(
        make_gateway: Callable[..., Any], redis_url: str) -> None:
    first, second = await pair(make_gateway, redis_url)
    token = await first.token()
    assert await chat(second, token) == (200, None)  # cached by the second gateway, which trusts the feed
    await first.manage("DELETE", f"/tokens/{token['id']}", expect=204)
    started = asyncio.get_running_loop().time()
    while (seen := await chat(second, token)) == (200, None):
        assert asyncio.get_running_loop().time() - started < 1.0, "the revocation did not arrive within 1 s"
    assert seen == (401, "token_revoked")
    # A limit changed on the second reaches the first the same way.
    other = await second.token((await second.project("second"))["id"], max_requests=100)
    assert await chat(first, other) == (200, None)
    await second.manage("PATCH", f"/tokens/{other['id']}", {"is_active": False}, expect=200)
    started = asyncio.get_running_loop().time()
    while (seen := await chat(first, other)) == (200, None):
        assert asyncio.get_running_loop().time() - started < 1.0, "the pause did not arrive within 1 s"
    assert seen == (401, "token_revoked")


async def test_a_flushed_redis_is_seeded_again_from_what_each_gateway_last_saw(
        make_gateway: Callable[..., Any], redis_url: str) -> None:
    first, second = await pair(make_gateway, redis_url)
    token = await first.token(max_requests=10)
    for gateway in (first, second, first, second):  # the first saw counts 1 and 3, the second 2 and 4
        assert await chat(gateway, token) == (200, None)
    await until_spent(redis_url, token["id"], 28)  # the usage of all four is in Redis
    client = Redis.from_url(redis_url)
    try:
        await client.flushall()
    finally:
        await client.aclose()
    # The first to ask after the flush seeds the counters with its own view: 4 if the second's last
    # count reached it with its usage batch, else 3 (then the quota is overrun by that 1, never more).
    # Nothing fails.
    outcomes = [await chat(gateway, token) for gateway in (first, second) * 5]
    admitted = outcomes.count((200, None))
    assert admitted in (6, 7) and outcomes.count((429, "quota_exceeded")) == 10 - admitted, outcomes
    # Seeded with 3 requests and the usage the first had last seen (7 to 28: usage reaches Redis in
    # batches just after the answers), then 7 answers of 7 tokens.
    counters: dict[str, int] = {}
    for _ in range(100):
        counters = await shared_counters(redis_url, token["id"])
        if counters["total"] - 49 in (7, 14, 21, 28):
            break
        await asyncio.sleep(0.02)
    assert counters["requests"] == 10 and counters["total"] - 49 in (7, 14, 21, 28), counters
    assert "system.degraded" not in await audit_actions(first)
    # The database counts what was served, flush or not.
    for gateway in (first, second):
        await gateway.app[TOKEN_CACHE].flush()
    assert scalar(first.settings.database_path, "SELECT request_count FROM tokens WHERE id = ?",
                  (token["id"],)) == 4 + admitted


async def test_an_admitted_request_costs_one_round_trip_to_redis(make_gateway: Callable[..., Any],
                                                                  redis_url: str) -> None:
    """One script decides the IP block, quota, budget, rate and global rate; usage follows in batches."""
    first, second = await pair(make_gateway, redis_url, GLOBAL_RATE_LIMIT="100000", IP_RATE_LIMIT="10")
    token = await first.token(max_requests=1000, max_tokens_total=100000, rate_limit_per_minute=10000)
    assert await chat(second, token) == (200, None)  # loaded into the second's cache
    client = Redis.from_url(redis_url)

    async def usage_reaches(total: int) -> None:
        for _ in range(100):  # the usage batches leave within 20 ms of the answers
            if (await shared_counters(redis_url, token["id"])).get("total") == total:
                return
            await asyncio.sleep(0.02)
        assert (await shared_counters(redis_url, token["id"]))["total"] == total

    try:
        await usage_reaches(7)  # the first request's usage batch is out before counting starts
        await client.config_resetstat()
        outcomes = await asyncio.gather(*(chat(gateway, token) for _ in range(20) for gateway in (first, second)))
        assert outcomes == [(200, None)] * 40
        await usage_reaches(41 * 7)
        # Read after every batch has landed (read before, the last batch's call could be missing).
        stats = await client.info("commandstats")
        counts = {name.removeprefix("cmdstat_"): value["calls"] for name, value in stats.items()}
    finally:
        await client.aclose()
    # 40 admissions, and the usage of 40 answers in a few batches (not 40 more calls, nor an IP check
    # each: commandstats also counts the commands the scripts run, so only the calls of scripts tell).
    assert 40 < counts.get("evalsha", 0) <= 48, counts
    assert "eval" not in counts and "get" not in counts, counts
