"""The GCRA rate limiter (RateLimiter): bursts, continuous refill, limit changes, memory, an exact reference model."""

from __future__ import annotations

import math
from collections.abc import Iterator
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_proxy.limiting.base import UNLIMITED, Decision
from llm_proxy.limiting.memory import RateLimiter
from tests.fakes import FakeClock


@pytest.fixture
def limiter(clock: FakeClock) -> RateLimiter:
    return RateLimiter(clock=clock)


def burst(limiter: RateLimiter, key: object, limit: int, times: int) -> list[Decision]:
    return [limiter.hit(key, limit) for _ in range(times)]


# --- RateLimiter ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uptime", "limit"),
    [*((u, n) for u in (0.0, 3e7) for n in (1, 2, 7, 10, 60, 599, 600, 100_000)), (3e7, 1_000_003)],
)
def test_burst_of_exactly_n_then_denied(clock: FakeClock, uptime: float, limit: int) -> None:
    clock.now = uptime
    limiter = RateLimiter(clock=clock)
    decisions = burst(limiter, "tok", limit, limit)
    assert all(d.allowed for d in decisions)
    denied = limiter.hit("tok", limit)
    assert not denied.allowed
    assert denied.remaining == 0
    assert denied.limit == limit


def test_remaining_counts_requests_left_after_this_one(limiter: RateLimiter) -> None:
    assert [d.remaining for d in burst(limiter, "tok", 5, 6)] == [4, 3, 2, 1, 0, 0]


def test_retry_after_is_time_until_next_request_is_allowed(limiter: RateLimiter, clock: FakeClock) -> None:
    burst(limiter, "tok", 60, 60)
    assert limiter.hit("tok", 60).retry_after == pytest.approx(1.0)
    clock.advance(0.25)
    denied = limiter.hit("tok", 60)
    assert denied.retry_after == pytest.approx(0.75)
    clock.advance(denied.retry_after)
    assert limiter.hit("tok", 60).allowed


def test_retry_after_is_zero_when_allowed(limiter: RateLimiter) -> None:
    assert limiter.hit("tok", 10).retry_after == 0.0


@pytest.mark.parametrize(
    ("decision", "header"),
    [
        (Decision(True, 10, 3, 0.0), 0),
        (Decision(False, 10, 0, 0.000001), 1),
        (Decision(False, 10, 0, 1.0), 1),
        (Decision(False, 10, 0, 1.2), 2),
        (Decision(False, 1, 0, 59.999), 60),
    ],
)
def test_retry_after_seconds_rounds_up_for_the_header(decision: Decision, header: int) -> None:
    assert decision.retry_after_seconds == header


@pytest.mark.parametrize(("limit", "step"), [(60, 1.0), (600, 0.1), (1, 60.0), (7, 60 / 7)])
def test_refills_one_request_per_60_over_n_seconds(
    limiter: RateLimiter, clock: FakeClock, limit: int, step: float
) -> None:
    burst(limiter, "tok", limit, limit)
    for _ in range(5):
        clock.advance(step * 0.99)
        assert not limiter.hit("tok", limit).allowed
        clock.advance(step * 0.01)
        assert limiter.hit("tok", limit).allowed
        assert not limiter.hit("tok", limit).allowed


def test_refill_is_continuous_and_accumulates(limiter: RateLimiter, clock: FakeClock) -> None:
    burst(limiter, "tok", 60, 60)
    clock.advance(10)
    decisions = burst(limiter, "tok", 60, 11)
    assert [d.allowed for d in decisions] == [True] * 10 + [False]


def test_refill_never_exceeds_the_burst(limiter: RateLimiter, clock: FakeClock) -> None:
    burst(limiter, "tok", 10, 10)
    clock.advance(3600)
    assert [d.allowed for d in burst(limiter, "tok", 10, 11)] == [True] * 10 + [False]


def test_zero_is_unlimited_and_stores_nothing(limiter: RateLimiter) -> None:
    assert all(d is UNLIMITED for d in burst(limiter, "tok", 0, 10_000))
    assert UNLIMITED.allowed and UNLIMITED.limit == 0 and UNLIMITED.retry_after == 0.0
    assert limiter.peek("tok", 0) is UNLIMITED
    assert len(limiter) == 0


@pytest.mark.parametrize("method", ["hit", "peek"])
def test_negative_limit_is_rejected(limiter: RateLimiter, method: str) -> None:
    with pytest.raises(ValueError, match="limit_per_minute"):
        getattr(limiter, method)("tok", -1)


def test_denied_hits_consume_nothing(clock: FakeClock) -> None:
    hammered, quiet = RateLimiter(clock=clock), RateLimiter(clock=clock)
    burst(hammered, "tok", 60, 60)
    burst(quiet, "tok", 60, 60)
    for _ in range(100):
        clock.advance(1 / 128)  # binary fractions keep the fake clock exact
        assert not hammered.hit("tok", 60).allowed
    clock.advance(1 - 100 / 128)
    assert hammered.hit("tok", 60) == quiet.hit("tok", 60) == Decision(True, 60, 0, 0.0)


def test_keys_are_independent(limiter: RateLimiter) -> None:
    burst(limiter, "a", 3, 3)
    assert not limiter.hit("a", 3).allowed
    assert [d.remaining for d in burst(limiter, "b", 3, 3)] == [2, 1, 0]
    assert limiter.hit(("tuple", 1), 3).allowed


def test_peek_reports_without_consuming(limiter: RateLimiter, clock: FakeClock) -> None:
    assert limiter.peek("tok", 5) == Decision(True, 5, 5, 0.0)
    assert len(limiter) == 0
    burst(limiter, "tok", 5, 3)
    assert limiter.peek("tok", 5) == Decision(True, 5, 2, 0.0)
    assert limiter.peek("tok", 5) == Decision(True, 5, 2, 0.0)
    burst(limiter, "tok", 5, 2)
    denied = limiter.peek("tok", 5)
    assert not denied.allowed and denied.retry_after == pytest.approx(12.0)
    clock.advance(12.0)
    assert limiter.peek("tok", 5).remaining == 1


def test_raising_a_limit_grants_the_difference_at_once(limiter: RateLimiter, clock: FakeClock) -> None:
    """An operator who raises a throttled client's limit expects relief on the next request:
    the requests already made keep their number, priced at the new rate."""
    burst(limiter, "tok", 10, 5)  # 5 of 10 used
    assert limiter.peek("tok", 100).remaining == 95
    assert [d.allowed for d in burst(limiter, "tok", 100, 96)] == [True] * 95 + [False]


def test_raising_the_limit_of_a_key_that_used_all_of_it(limiter: RateLimiter, clock: FakeClock) -> None:
    assert [d.allowed for d in burst(limiter, "tok", 5, 6)] == [True] * 5 + [False]
    first = limiter.hit("tok", 100)
    assert (first.allowed, first.limit, first.remaining) == (True, 100, 94)
    clock.advance(30)  # refills at the new rate: half a minute is 50 requests
    assert limiter.peek("tok", 100).remaining == 100


def test_raising_then_lowering_back_is_no_free_burst(limiter: RateLimiter) -> None:
    burst(limiter, "tok", 5, 5)
    burst(limiter, "tok", 100, 95)  # every request of the raised limit used
    assert not limiter.hit("tok", 5).allowed


def test_lowering_a_limit_never_makes_a_key_wait_over_a_minute(limiter: RateLimiter, clock: FakeClock) -> None:
    burst(limiter, "tok", 1000, 1000)
    denied = limiter.hit("tok", 1)
    assert not denied.allowed
    assert 0 < denied.retry_after <= 60.0
    clock.advance(denied.retry_after)
    assert limiter.hit("tok", 1).allowed
    assert not limiter.hit("tok", 1).allowed


def test_lowering_a_limit_keeps_the_used_share(limiter: RateLimiter) -> None:
    burst(limiter, "tok", 100, 50)  # half the minute used
    assert [d.allowed for d in burst(limiter, "tok", 10, 6)] == [True] * 5 + [False]


def test_refill_stays_exact_after_a_long_uptime() -> None:
    clock = FakeClock(now=3e7)  # about a year of time.monotonic()
    limiter = RateLimiter(clock=clock)
    for _ in range(3):
        assert all(d.allowed for d in burst(limiter, "tok", 100_000, 100_000))
        assert not limiter.hit("tok", 100_000).allowed
        clock.advance(60)


@pytest.mark.parametrize("limit", [7, 13, 419])
def test_long_run_rate_is_n_per_minute_when_60_s_does_not_divide(clock: FakeClock, limit: int) -> None:
    limiter = RateLimiter(clock=clock)
    start = clock.now
    admitted = 0
    for i in range(3600 * 8 + 1):
        clock.now = start + i / 8
        admitted += limiter.hit("tok", limit).allowed
    assert admitted == limit + limit * 60


def test_max_keys_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_keys"):
        RateLimiter(max_keys=0)


# --- RateLimiter against an exact reference model --------------------------------------------------

BASE_MS = 10_000_000  # the fake clock starts well away from zero, as time.monotonic() does


Outcome = tuple[bool, int, Fraction]  # allowed, remaining, retry_after


class TokenBucket:
    """Reference: a continuous token bucket in exact arithmetic, capacity N, refill N/60 per second."""

    def __init__(self, limit: int, now: Fraction) -> None:
        self.limit = limit
        self.tokens = Fraction(limit)
        self.updated = now

    def _refill(self, now: Fraction) -> None:
        self.tokens = min(Fraction(self.limit), self.tokens + (now - self.updated) * self.limit / 60)
        self.updated = now

    def peek(self, now: Fraction) -> Outcome:
        self._refill(now)
        if self.tokens >= 1:
            return True, math.floor(self.tokens), Fraction(0)
        return False, 0, (1 - self.tokens) * 60 / self.limit

    def hit(self, now: Fraction) -> Outcome:
        allowed, _, retry_after = self.peek(now)
        if allowed:
            self.tokens -= 1
        return allowed, math.floor(self.tokens) if allowed else 0, retry_after


# Times on a millisecond grid, so exact boundaries (a refill landing precisely on a whole request)
# are common. Limits dividing 60 s into whole femtoseconds, for which the limiter is exact.
EXACT_LIMITS = [n for n in range(1, 100_001) if 60 * 10**15 % n == 0]
advances_ms = st.one_of(st.just(0), st.integers(0, 2_000), st.integers(0, 90_000))
operations = st.lists(
    st.tuples(advances_ms, st.integers(0, 4), st.sampled_from(["hit", "hit", "hit", "peek"])),
    max_size=200,
)
limits = st.lists(st.sampled_from(EXACT_LIMITS), min_size=5, max_size=5)


def run_against_reference(
    limiter: RateLimiter, clock: FakeClock, key_limits: list[int], ops: list[tuple[int, int, str]]
) -> Iterator[tuple[Decision, Outcome]]:
    now_ms = BASE_MS
    clock.now = now_ms / 1000
    buckets = [TokenBucket(limit, Fraction(now_ms, 1000)) for limit in key_limits]
    for advance, key, op in ops:
        now_ms += advance
        clock.now = now_ms / 1000
        expected = getattr(buckets[key], op)(Fraction(now_ms, 1000))
        yield getattr(limiter, op)(key, key_limits[key]), expected


@settings(max_examples=300, deadline=None)
@given(key_limits=limits, ops=operations)
def test_gcra_agrees_with_an_exact_token_bucket(key_limits: list[int], ops: list[tuple[int, int, str]]) -> None:
    clock = FakeClock(1000.0)
    limiter = RateLimiter(clock=clock)
    for got, (allowed, remaining, retry_after) in run_against_reference(limiter, clock, key_limits, ops):
        assert got.allowed == allowed
        assert got.remaining == remaining
        assert got.retry_after == pytest.approx(float(retry_after), abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(key_limits=limits, ops=operations, max_keys=st.integers(1, 4))
def test_evicting_at_the_cap_only_ever_forgives(
    key_limits: list[int], ops: list[tuple[int, int, str]], max_keys: int
) -> None:
    clock = FakeClock(1000.0)
    limiter = RateLimiter(max_keys=max_keys, clock=clock)
    for got, (allowed, _, _) in run_against_reference(limiter, clock, key_limits, ops):
        assert got.allowed or not allowed
        assert len(limiter) <= max_keys


# --- RateLimiter memory bound ----------------------------------------------------------------------


def test_keys_idle_for_a_minute_are_dropped_as_new_keys_arrive(clock: FakeClock) -> None:
    limiter = RateLimiter(max_keys=1_000_000, clock=clock)
    start = clock.now
    # Limit 1 is the worst case: each key's arrival time lies a full minute ahead.
    for i in range(100_000):
        limiter.hit(i, 1)
    assert len(limiter) == 100_000
    clock.advance(61)
    # New keys at 100 a second: only the last minute's 6000 may be held.
    for i in range(100_000, 200_000):
        before = len(limiter)
        clock.now = start + 61 + (i - 100_000) / 100
        limiter.hit(i, 1)
        assert len(limiter) < before or len(limiter) <= 6001
    assert len(limiter) <= 6001
    assert 199_999 in limiter and 0 not in limiter


def test_steady_churn_holds_only_the_last_minute_of_keys(clock: FakeClock) -> None:
    limiter = RateLimiter(max_keys=1_000_000, clock=clock)
    start = clock.now
    peak = 0
    for i in range(100_000):
        clock.now = start + i / 100
        limiter.hit(f"10.0.{i // 256}.{i % 256}", 1)
        peak = max(peak, len(limiter))
    assert peak <= 6001


def test_short_lived_state_is_dropped_sooner(clock: FakeClock) -> None:
    limiter = RateLimiter(clock=clock)
    start = clock.now
    for i in range(100_000):
        clock.now = start + i / 100
        limiter.hit(i, 60)  # one hit at 60/min is forgotten after a second
    assert len(limiter) <= 101


def test_hard_cap_forgets_the_least_recently_admitted_key(clock: FakeClock) -> None:
    limiter = RateLimiter(max_keys=1000, clock=clock)
    burst(limiter, "victim", 3, 3)
    limiter.hit("regular", 1000)
    for i in range(100_000):
        limiter.hit(i, 3)
        assert len(limiter) <= 1000
        if i % 500 == 0:
            assert limiter.hit("regular", 1000).allowed  # admitted recently, so never the oldest
    assert len(limiter) == 1000
    assert "victim" not in limiter
    assert limiter.hit("victim", 3).allowed
    assert "regular" in limiter
    assert limiter.peek("regular", 1000).remaining == 1000 - 201


def test_denied_hits_do_not_refresh_a_key(clock: FakeClock) -> None:
    limiter = RateLimiter(max_keys=2, clock=clock)
    burst(limiter, "a", 1, 1)
    limiter.hit("b", 1)
    assert not limiter.hit("a", 1).allowed
    limiter.hit("c", 1)
    assert "a" not in limiter and "b" in limiter and "c" in limiter
