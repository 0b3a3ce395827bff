"""The shared failed-authentication counter (RedisFailureLimiter) on a real Redis: FailureCounter's
outcomes on a settable clock, and one allowance per IP for every process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

pytest.importorskip("redis", reason="the redis extra is not installed (`make test` installs it)")

from redis.asyncio import Redis

from llm_proxy.limiting.memory import FailureCounter
from llm_proxy.limiting.redis import RedisFailureLimiter
from tests.fakes import FakeClock

Failures = FailureCounter | RedisFailureLimiter


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


@pytest.fixture(params=["memory", "redis"])
def make_failures(request: pytest.FixtureRequest, clock: FakeClock) -> Callable[[int], Failures]:
    """Build a failure counter of either backend, both reading the test's clock."""
    if request.param == "memory":
        return lambda limit: FailureCounter(limit, clock=clock)
    client = request.getfixturevalue("connect")()
    return lambda limit: RedisFailureLimiter(client, limit, clock=clock)


async def test_ip_is_blocked_once_it_used_up_its_failures(make_failures: Callable[[int], Failures]) -> None:
    failures = make_failures(5)
    for _ in range(4):
        await failures.record_failure("203.0.113.7")
        assert not await failures.is_blocked("203.0.113.7")
    await failures.record_failure("203.0.113.7")
    assert await failures.is_blocked("203.0.113.7")
    assert await failures.retry_after("203.0.113.7") == pytest.approx(12.0)
    assert await failures.retry_after("203.0.113.8") == 0.0


async def test_blocked_ip_recovers_one_attempt_per_refill(make_failures: Callable[[int], Failures],
                                                          clock: FakeClock) -> None:
    failures = make_failures(60)
    for _ in range(60):
        await failures.record_failure("198.51.100.1")
    clock.advance(0.5)
    assert await failures.retry_after("198.51.100.1") == pytest.approx(0.5)
    clock.advance(0.5)
    assert not await failures.is_blocked("198.51.100.1")
    await failures.record_failure("198.51.100.1")
    assert await failures.is_blocked("198.51.100.1")
    clock.advance(60)
    assert not await failures.is_blocked("198.51.100.1")


async def test_slow_failures_never_block(make_failures: Callable[[int], Failures], clock: FakeClock) -> None:
    failures = make_failures(6)
    for _ in range(30):
        await failures.record_failure("192.0.2.1")
        assert not await failures.is_blocked("192.0.2.1")
        clock.advance(10)


async def test_failure_limit_zero_never_blocks(make_failures: Callable[[int], Failures]) -> None:
    failures = make_failures(0)
    for _ in range(100):
        await failures.record_failure("192.0.2.1")
    assert not await failures.is_blocked("192.0.2.1")
    assert failures.limit == 0


async def test_two_processes_share_one_allowance_per_ip(connect: Callable[[], Redis]) -> None:
    first, second = RedisFailureLimiter(connect(), 10), RedisFailureLimiter(connect(), 10)
    await asyncio.gather(*(process.record_failure("2001:db8::7") for process in (first, second) for _ in range(5)))
    assert await first.is_blocked("2001:db8::7")
    assert 0 < await second.retry_after("2001:db8::7") <= 6.0
    assert not await second.is_blocked("2001:db8::8")


async def test_the_key_is_the_ip_under_the_prefix_and_expires(connect: Callable[[], Redis]) -> None:
    client = connect()
    await RedisFailureLimiter(client, 60).record_failure("203.0.113.9")
    assert await client.keys("*") == [b"llm-proxy:auth-failures:203.0.113.9"]
    assert 0 < await client.pttl("llm-proxy:auth-failures:203.0.113.9") <= 1001


async def test_a_negative_limit_is_an_error(make_failures: Callable[[int], Failures]) -> None:
    with pytest.raises(ValueError, match="limit_per_minute"):
        make_failures(-1)
