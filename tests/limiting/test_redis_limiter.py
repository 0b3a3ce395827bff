"""The shared limiter (RedisLimiter) on a real Redis: MemoryLimiter's outcomes, one allowance for every
process, exact quotas under concurrency, one round trip per admission, seeding after a flush."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import pytest

pytest.importorskip("redis", reason="the redis extra is not installed (`make test` installs it)")

from redis.asyncio import Connection, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from llm_proxy.errors import TooManyRequests
from llm_proxy.limiting.base import UNLIMITED, Limiter, SharedStateUnavailable
from llm_proxy.limiting.memory import MemoryLimiter
from llm_proxy.limiting.redis import Counters, RedisLimiter
from llm_proxy.models import Credential, ProjectState
from tests.fakes import FakeClock
from tests.servers import free_port

_ids = itertools.count()


def credential(expires_at: float, **fields: Any) -> Credential:
    """A token as the cache holds it after loading it from the database (its stored counts in `fields`)."""
    values: dict[str, Any] = {
        "id": f"0000-token-{next(_ids)}", "hint": "tok-abcd****wxyz", "project": ProjectState("p", True, "Bearer k"),
        "expires_at": expires_at, "is_active": True, "revoked": False, "replaced": False, "max_requests": None,
        "rate_limit_per_minute": None, "max_tokens_total": None, "request_count": 0, "prompt_tokens": 0,
        "completion_tokens": 0, "total_tokens": 0, "last_used_at": None}
    return Credential(**{**values, **fields})


def copy(token: Credential) -> Credential:
    """The same token as another process caches it: same id and stored counts, an object of its own."""
    return replace(token)


async def attempt(limiter: Limiter, token: Credential, rate: int) -> tuple[Any, ...]:
    """Admit one request and say what happened, as a client would see it."""
    try:
        decision = await limiter.admit(token, rate)
    except TooManyRequests as exc:
        return exc.code, exc.headers
    return "ok", decision.limit, decision.remaining


@pytest.fixture
async def connect(redis_url: str) -> AsyncIterator[Callable[[], Redis]]:
    """Open clients of the test's Redis, each with its own connection pool (a process of its own)."""
    clients: list[Redis] = []

    def open_client() -> Redis:
        clients.append(Redis.from_url(redis_url))
        return clients[-1]

    yield open_client
    for client in clients:
        await client.aclose()


# ---- the same outcomes as MemoryLimiter, on a settable clock ----


@pytest.fixture(params=["memory", "redis"])
def make_limiter(request: pytest.FixtureRequest, clock: FakeClock) -> Callable[..., Limiter]:
    """Build a limiter of either backend, both reading the test's clock."""
    if request.param == "memory":
        return lambda global_rate=0: MemoryLimiter(global_rate=global_rate, clock=clock, monotonic=clock)
    client = request.getfixturevalue("connect")()
    return lambda global_rate=0: RedisLimiter(client, global_rate=global_rate, clock=clock)


@pytest.mark.parametrize("limit", [1, 7, 60, 599])
async def test_a_burst_is_exactly_the_rate(make_limiter: Callable[..., Limiter], clock: FakeClock,
                                           limit: int) -> None:
    limiter, token = make_limiter(), credential(clock() + 3600)
    outcomes = [await attempt(limiter, token, limit) for _ in range(limit + 1)]
    assert outcomes[:limit] == [("ok", limit, left) for left in range(limit - 1, -1, -1)]
    assert outcomes[limit] == ("rate_limited", {"X-RateLimit-Limit": str(limit), "X-RateLimit-Remaining": "0",
                                                "Retry-After": str(-(-60 // limit))})


async def test_a_rate_refills_continuously(make_limiter: Callable[..., Limiter], clock: FakeClock) -> None:
    limiter, token = make_limiter(), credential(clock() + 3600)
    for _ in range(5):
        await attempt(limiter, token, 5)
    clock.advance(6)
    assert (await attempt(limiter, token, 5))[1]["Retry-After"] == "6"
    clock.advance(6)
    assert await attempt(limiter, token, 5) == ("ok", 5, 0)
    clock.advance(24)
    assert await attempt(limiter, token, 5) == ("ok", 5, 1)


async def test_out_of_quota_spends_no_rate(make_limiter: Callable[..., Limiter], clock: FakeClock) -> None:
    limiter, token = make_limiter(), credential(clock() + 3600, max_requests=2)
    assert [await attempt(limiter, token, 3) for _ in range(2)] == [("ok", 3, 2), ("ok", 3, 1)]
    refused = ("quota_exceeded", {"Retry-After": "3600", "x-should-retry": "false"})
    assert [await attempt(limiter, token, 3) for _ in range(5)] == [refused] * 5
    assert token.request_count == 2
    token.max_requests = 4  # raised by PATCH
    assert await attempt(limiter, token, 3) == ("ok", 3, 0)
    assert (await attempt(limiter, token, 3))[0] == "rate_limited"


async def test_a_spent_budget_refuses_before_the_rate(make_limiter: Callable[..., Limiter], clock: FakeClock) -> None:
    limiter = make_limiter()
    token = credential(clock() + 600, max_tokens_total=100, total_tokens=100, request_count=7)
    refused = ("budget_exceeded", {"Retry-After": "600", "x-should-retry": "false"})
    assert [await attempt(limiter, token, 1) for _ in range(3)] == [refused] * 3
    token.max_tokens_total = 101
    assert await attempt(limiter, token, 1) == ("ok", 1, 0)
    assert token.request_count == 8


async def test_the_global_rate_and_the_token_rate_spend_nothing_of_each_other(
        make_limiter: Callable[..., Limiter], clock: FakeClock) -> None:
    limiter = make_limiter(global_rate=3)
    first, second = credential(clock() + 3600), credential(clock() + 3600)
    assert [(await attempt(limiter, first, 2))[0] for _ in range(4)] == ["ok", "ok", "rate_limited", "rate_limited"]
    assert await attempt(limiter, second, 2) == ("ok", 2, 1)  # the first's refusals took no global allowance
    assert await attempt(limiter, second, 2) == ("rate_limited", {
        "X-RateLimit-Limit": "3", "X-RateLimit-Remaining": "0", "Retry-After": "20"})
    clock.advance(20)
    assert await attempt(limiter, second, 2) == ("ok", 2, 0)  # the global refusal took none of its own


async def test_a_raised_rate_is_granted_at_once_and_a_lowered_one_keeps_the_share_used(
        make_limiter: Callable[..., Limiter], clock: FakeClock) -> None:
    limiter, token = make_limiter(), credential(clock() + 3600)
    for _ in range(5):
        await attempt(limiter, token, 5)
    assert await attempt(limiter, token, 100) == ("ok", 100, 94)
    other = credential(clock() + 3600)
    for _ in range(50):
        await attempt(limiter, other, 100)
    assert [(await attempt(limiter, other, 10))[0] for _ in range(6)] == ["ok"] * 5 + ["rate_limited"]


async def test_rate_zero_is_unlimited_and_a_negative_rate_is_an_error(
        make_limiter: Callable[..., Limiter], clock: FakeClock) -> None:
    limiter, token = make_limiter(), credential(clock() + 3600)
    assert [await limiter.admit(token, 0) for _ in range(50)] == [UNLIMITED] * 50
    assert token.request_count == 50
    with pytest.raises(ValueError, match="limit_per_minute"):
        await limiter.admit(token, -1)


async def test_a_refund_gives_the_quota_back(make_limiter: Callable[..., Limiter], clock: FakeClock) -> None:
    limiter, token = make_limiter(), credential(clock() + 3600, max_requests=1)
    assert (await attempt(limiter, token, 0))[0] == "ok"
    assert (await attempt(limiter, token, 0))[0] == "quota_exceeded"
    await limiter.refund(token)
    assert token.request_count == 0
    assert (await attempt(limiter, token, 0))[0] == "ok"


# ---- one allowance across processes (each limiter on a client and pool of its own) ----


async def test_max_requests_is_never_exceeded_by_two_processes_at_once(connect: Callable[[], Redis]) -> None:
    processes = [RedisLimiter(connect(), global_rate=0) for _ in range(2)]
    token = credential(time.time() + 3600, max_requests=25)
    views = [copy(token), copy(token)]
    outcomes = await asyncio.gather(*(attempt(processes[n % 2], views[n % 2], 0) for n in range(60)))
    assert Counter(outcome[0] for outcome in outcomes) == {"ok": 25, "quota_exceeded": 35}
    assert await processes[0].counters([token.id]) == {token.id: Counters(25, 0, 0, 0)}


async def test_a_token_rate_is_one_allowance_across_processes(connect: Callable[[], Redis]) -> None:
    processes = [RedisLimiter(connect(), global_rate=0) for _ in range(2)]
    token = credential(time.time() + 3600)
    views = [copy(token), copy(token)]
    outcomes = await asyncio.gather(*(attempt(processes[n % 2], views[n % 2], 10) for n in range(30)))
    assert Counter(outcome[0] for outcome in outcomes) == {"ok": 10, "rate_limited": 20}
    assert sorted(outcome[2] for outcome in outcomes if outcome[0] == "ok") == list(range(10))


async def test_the_global_rate_is_one_allowance_across_processes(connect: Callable[[], Redis]) -> None:
    processes = [RedisLimiter(connect(), global_rate=5) for _ in range(2)]
    tokens = [credential(time.time() + 3600) for _ in range(12)]
    outcomes = await asyncio.gather(*(attempt(processes[n % 2], token, 0) for n, token in enumerate(tokens)))
    assert Counter(outcome[0] for outcome in outcomes) == {"ok": 5, "rate_limited": 7}
    assert all(outcome[1]["X-RateLimit-Limit"] == "5" for outcome in outcomes if outcome[0] != "ok")


async def test_a_budget_spent_through_one_process_refuses_on_the_other(connect: Callable[[], Redis]) -> None:
    first, second = (RedisLimiter(connect(), global_rate=0) for _ in range(2))
    token = credential(time.time() + 3600, max_tokens_total=100)
    here, there = copy(token), copy(token)
    assert (await attempt(first, here, 0))[0] == "ok"
    await first.add_usage(here, 60, 40, 100)
    assert (here.prompt_tokens, here.completion_tokens, here.total_tokens) == (60, 40, 100)
    assert (await attempt(second, there, 0))[0] == "budget_exceeded"
    assert (there.request_count, there.total_tokens) == (1, 100)  # the other process's view, refreshed


async def test_a_refund_through_one_process_frees_the_quota_for_another(connect: Callable[[], Redis]) -> None:
    first, second = (RedisLimiter(connect(), global_rate=0) for _ in range(2))
    token = credential(time.time() + 3600, max_requests=1)
    here, there = copy(token), copy(token)
    assert (await attempt(first, here, 0))[0] == "ok"
    assert (await attempt(second, there, 0))[0] == "quota_exceeded"
    await first.refund(here)
    assert (await attempt(second, there, 0))[0] == "ok"
    assert await first.counters([token.id, "never-used"]) == {token.id: Counters(1, 0, 0, 0)}


# ---- seeding, keys, round trips, failures ----


async def test_counters_are_seeded_from_the_stored_counts_and_again_after_a_flush(
        connect: Callable[[], Redis]) -> None:
    client = connect()
    limiter = RedisLimiter(client, global_rate=0)
    token = credential(time.time() + 3600, max_requests=22, request_count=20, prompt_tokens=5, completion_tokens=6,
                       total_tokens=11)
    assert (await attempt(limiter, token, 0))[0] == "ok"
    assert await limiter.counters([token.id]) == {token.id: Counters(21, 5, 6, 11)}
    assert (await attempt(limiter, token, 0))[0] == "ok"
    await client.flushdb()  # Redis emptied (FLUSHDB on the test's database; a restart without persistence alike)
    assert await limiter.counters([token.id]) == {}
    assert (await attempt(limiter, token, 0))[0] == "quota_exceeded"  # seeded with the 22 this process last saw
    await limiter.add_usage(token, 1, 1, 2)
    assert await limiter.counters([token.id]) == {token.id: Counters(22, 6, 7, 13)}


async def test_keys_name_token_ids_and_expire(connect: Callable[[], Redis]) -> None:
    client = connect()
    token = credential(time.time() + 3600)
    await RedisLimiter(client, global_rate=60).admit(token, 60)
    keys = {key.decode() for key in await client.keys("*")}
    assert keys == {f"llm-proxy:usage:{token.id}", f"llm-proxy:rate:{token.id}", "llm-proxy:global-rate"}
    assert 3600 + 86_400 - 5 <= await client.ttl(f"llm-proxy:usage:{token.id}") <= 3600 + 86_400
    assert 0 < await client.pttl(f"llm-proxy:rate:{token.id}") <= 1001  # idle again after one interval
    assert 0 < await client.pttl("llm-proxy:global-rate") <= 1001


class CountingConnection(Connection):
    """A real connection that counts what it writes to the server and what it reads back."""

    writes = 0
    reads = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.writes += 1
        await super().send_packed_command(command, check_health)

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        CountingConnection.reads += 1
        return await super().read_response(*args, **kwargs)


async def _command_calls(observer: Redis) -> Counter[str]:
    stats = await observer.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): entry["calls"] for name, entry in stats.items()})


async def test_every_admission_is_one_round_trip(redis_url: str, connect: Callable[[], Redis]) -> None:
    """Counted on both ends: the client writes once and reads once per call, and the server runs one
    EVALSHA per call (the other commands it counts are the script's own: none is a script load)."""
    client = Redis.from_url(redis_url, connection_class=CountingConnection)
    observer = connect()
    try:
        limiter = RedisLimiter(client, global_rate=1000)
        token = credential(time.time() + 3600, max_tokens_total=10_000)
        spent = credential(time.time() + 3600, max_requests=2)
        await limiter.admit(credential(time.time() + 3600), 0)  # the connection is opened and the script loaded
        before, writes, reads = await _command_calls(observer), CountingConnection.writes, CountingConnection.reads
        outcomes = [(await attempt(limiter, token, 10))[0] for _ in range(15)]
        outcomes += [(await attempt(limiter, spent, 0))[0] for _ in range(5)]
        await limiter.refund(token)
        await limiter.add_usage(token, 3, 4, 7)
        assert (CountingConnection.writes - writes, CountingConnection.reads - reads) == (22, 22)
        ran = await _command_calls(observer) - before
    finally:
        await client.aclose()
    assert Counter(outcomes) == {"ok": 12, "rate_limited": 5, "quota_exceeded": 3}
    assert ran["evalsha"] == 22
    assert set(ran) <= {"evalsha", "info", "time", "exists", "hset", "hmget", "hincrby", "expire", "pexpire"}


async def test_scripts_are_loaded_again_after_the_server_forgets_them(connect: Callable[[], Redis]) -> None:
    client = connect()
    limiter = RedisLimiter(client, global_rate=0)
    token = credential(time.time() + 3600)
    await limiter.admit(token, 0)
    await client.script_flush()
    await limiter.admit(token, 0)
    assert token.request_count == 2


async def test_an_unreachable_redis_is_shared_state_unavailable() -> None:
    client = Redis(host="127.0.0.1", port=free_port(), retry=Retry(NoBackoff(), 0), socket_connect_timeout=2)
    try:
        with pytest.raises(SharedStateUnavailable) as raised:
            await RedisLimiter(client, global_rate=0).admit(credential(time.time() + 3600), 10)
    finally:
        await client.aclose()
    assert (raised.value.status, raised.value.code, raised.value.headers) == (
        503, "shared_state_unavailable", {"Retry-After": "1"})


# ---- the connections the scripts run on (kept, not taken from the pool per call) ----


async def _connections_named(observer: Redis, name: str) -> list[dict[str, Any]]:
    return [entry for entry in await observer.client_list() if entry["name"] == name]


async def test_connections_redis_dropped_are_opened_again_within_the_call(redis_url: str,
                                                                           connect: Callable[[], Redis]) -> None:
    """A restart (here CLIENT KILL) drops the kept connections: the client's Retry opens each again, no call fails."""
    client = Redis.from_url(redis_url, client_name="kept-limiter", retry=Retry(NoBackoff(), 1))
    observer = connect()
    try:
        limiter = RedisLimiter(client, global_rate=0)
        token = credential(time.time() + 3600)
        await asyncio.gather(*(limiter.admit(token, 0) for _ in range(3)))
        kept = await _connections_named(observer, "kept-limiter")
        assert len(kept) == 3  # one a call in flight, kept for the next ones
        for entry in kept:
            await observer.client_kill_filter(_id=entry["id"])
        await asyncio.gather(*(limiter.admit(token, 0) for _ in range(3)))
        assert await observer.hget(f"llm-proxy:usage:{token.id}", "requests") == b"6"
        assert len(await _connections_named(observer, "kept-limiter")) == 3
    finally:
        await client.aclose()
    assert await _connections_named(observer, "kept-limiter") == []  # closed with the client


async def test_a_stalled_redis_is_given_up_on_after_the_socket_timeout(redis_url: str,
                                                                       connect: Callable[[], Redis]) -> None:
    client = Redis.from_url(redis_url, socket_timeout=0.2, retry=Retry(NoBackoff(), 0))
    observer = connect()
    try:
        limiter = RedisLimiter(client, global_rate=0)
        token = credential(time.time() + 3600)
        await limiter.admit(token, 0)
        await observer.client_pause(2000, all=False)  # writes wait, the admission script with them
        started = time.monotonic()
        with pytest.raises(SharedStateUnavailable):
            await limiter.admit(token, 0)
        waited = time.monotonic() - started
        await observer.client_unpause()
        assert 0.2 <= waited < 1.0
        await limiter.admit(token, 0)  # the connection given up on is opened again
        assert token.request_count == int((await observer.hget(f"llm-proxy:usage:{token.id}", "requests")) or 0)
    finally:
        await client.aclose()


async def test_a_cancelled_call_leaves_no_answer_for_the_next(redis_url: str, connect: Callable[[], Redis]) -> None:
    """A request cancelled while its script runs (the client went away) cannot hand its answer to another's."""
    client = connect()
    observer = connect()
    limiter = RedisLimiter(client, global_rate=0)
    first, second = credential(time.time() + 3600, request_count=100), credential(time.time() + 3600)
    await limiter.admit(first, 0)
    await observer.client_pause(2000, all=False)
    call = asyncio.ensure_future(limiter.admit(first, 0))
    await asyncio.sleep(0.1)
    call.cancel()
    await observer.client_unpause()
    with pytest.raises(asyncio.CancelledError):
        await call
    await limiter.admit(second, 0)  # on the connection the cancelled call used
    assert second.request_count == 1
