"""The failed-authentication counter behind IP blocking (FailureCounter), on a settable clock."""

from __future__ import annotations

import pytest

from llm_proxy.limiting.memory import FailureCounter
from tests.fakes import FakeClock


async def test_ip_is_blocked_once_it_used_up_its_failures(clock: FakeClock) -> None:
    failures = FailureCounter(5, clock=clock)
    for _ in range(4):
        await failures.record_failure("203.0.113.7")
        assert not await failures.is_blocked("203.0.113.7")
    await failures.record_failure("203.0.113.7")
    assert await failures.is_blocked("203.0.113.7")
    assert await failures.retry_after("203.0.113.7") == pytest.approx(12.0)
    assert not await failures.is_blocked("203.0.113.8")
    assert await failures.retry_after("203.0.113.8") == 0.0


async def test_blocked_ip_recovers_one_attempt_per_refill(clock: FakeClock) -> None:
    failures = FailureCounter(60, clock=clock)
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


async def test_slow_failures_never_block(clock: FakeClock) -> None:
    failures = FailureCounter(6, clock=clock)
    for _ in range(100):
        await failures.record_failure("192.0.2.1")
        assert not await failures.is_blocked("192.0.2.1")
        clock.advance(10)


async def test_failure_limit_zero_never_blocks(clock: FakeClock) -> None:
    failures = FailureCounter(0, clock=clock)
    for _ in range(1000):
        await failures.record_failure("192.0.2.1")
    assert not await failures.is_blocked("192.0.2.1")
    assert len(failures) == 0
    assert failures.limit == 0


async def test_failure_counter_rejects_negative_limit() -> None:
    with pytest.raises(ValueError, match="limit_per_minute"):
        FailureCounter(-1)


async def test_failure_counter_memory_is_capped(clock: FakeClock) -> None:
    failures = FailureCounter(60, max_keys=100, clock=clock)
    for i in range(10_000):
        await failures.record_failure(f"2001:db8::{i:x}")
    assert len(failures) == 100
