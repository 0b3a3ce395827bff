"""The limiters of one process, in memory: the admission decision (quota, budget, GCRA rates), failed
authentications per IP, and the concurrency cap."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

from llm_proxy.errors import BudgetExceeded, QuotaExceeded, RateLimited
from llm_proxy.limiting.base import UNLIMITED, Decision
from llm_proxy.models import Credential

_FS = 10**15  # femtoseconds per second: RateLimiter says why time is so fine an integer
_WINDOW = 60 * _FS  # every limit here is "per minute"
# Boundaries are compared at the clock's nanosecond resolution: an instant such as 60/7 s is no
# whole nanosecond, and reading the clock must not deny a request that arrives on time.
_CAPACITY = _WINDOW + 1_000_000 - 1

# Expired entries dropped per new key: more than the one entry a new key adds, so a backlog of
# idle keys shrinks while new keys arrive, and each hit does bounded work.
_SWEEP = 2


# A NamedTuple's generated __new__ costs three times a plain tuple build, on every request.
_new = tuple.__new__


class RateLimiter:
    """GCRA limiter: N per minute allows a burst of N, then refills continuously at N/60 per second.

    Each key costs one integer, its theoretical arrival time (TAT): the instant its bucket is full
    again. Times are integer femtoseconds (the clock read to the nanosecond) because a float TAT
    gains a rounding error on every request, enough to miscount a large burst, while integers add
    up exactly. The emission interval 60 s / N is rounded down to a femtosecond, so a limit is
    never enforced more strictly than stated, and is generous by under 1 fs per request and 1 ns
    per boundary (the clock's resolution): a burst is exactly N for any N below 200 million.

    A TAT in the past carries no information, so such keys are dropped: every new key first evicts
    up to two expired keys from the least recently admitted end. Memory is therefore bounded by
    the number of keys admitted during the last minute (a TAT is never more than 60 s past the
    key's last admitted request), plus a backlog that shrinks with every new key, and never
    exceeds `max_keys`: at the cap the least recently admitted key is forgotten, which can only
    let that key through sooner, never block anyone. Every operation is O(1).

    When a key's limit is raised, the requests it already made keep their number and are priced at
    the new rate, so the raise is granted at once: 5 of 5 used, raised to 100, leaves 95. When it is
    lowered, the share of its minute already used is kept (50 of 100 used, lowered to 10, leaves 5),
    so no key ever waits more than a minute. Each key therefore also keeps the interval its TAT was
    counted in.
    """

    __slots__ = ("_clock", "_max_keys", "_tats")

    def __init__(self, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._clock = clock
        self._max_keys = max_keys
        # OrderedDict, not dict: popping the front of a plain dict degrades to a scan over the
        # deleted slots, while OrderedDict keeps it O(1). Order = least recently admitted first.
        # Each key: (TAT, the emission interval it was counted in).
        self._tats: OrderedDict[Hashable, tuple[int, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tats)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._tats

    def hit(self, key: Hashable, limit_per_minute: int) -> Decision:
        """Count one request for `key` if its rate allows it; a denied request consumes nothing."""
        if limit_per_minute <= 0:
            return _unlimited(limit_per_minute)
        now = _now(self._clock)
        interval = _WINDOW // limit_per_minute or 1
        tats = self._tats
        entry = tats.get(key)
        if entry is None or entry[0] <= now:
            debt = interval  # fresh or idle key: always admitted, as interval <= window
        else:
            debt = _owed(entry, now, interval) + interval  # how far ahead of its rate the key gets with this request
            if debt > _CAPACITY:
                return _new(Decision, (False, limit_per_minute, 0, (debt - _WINDOW) / _FS))
        if entry is None:
            self._make_room(now)
        else:
            tats.move_to_end(key)
        tats[key] = (now + debt, interval)
        return _new(Decision, (True, limit_per_minute, (_CAPACITY - debt) // interval, 0.0))

    def peek(self, key: Hashable, limit_per_minute: int) -> Decision:
        """Report what a request for `key` would get now, without counting it."""
        if limit_per_minute <= 0:
            return _unlimited(limit_per_minute)
        now = _now(self._clock)
        entry = self._tats.get(key)
        if entry is None or entry[0] <= now:
            return _new(Decision, (True, limit_per_minute, limit_per_minute, 0.0))
        interval = _WINDOW // limit_per_minute or 1
        debt = _owed(entry, now, interval)
        remaining = (_CAPACITY - debt) // interval
        if remaining:
            return _new(Decision, (True, limit_per_minute, remaining, 0.0))
        return _new(Decision, (False, limit_per_minute, 0, (debt + interval - _WINDOW) / _FS))

    def _make_room(self, now: int) -> None:
        tats = self._tats
        for _ in range(_SWEEP):
            if not tats:
                return
            oldest = next(iter(tats))
            if tats[oldest][0] > now:
                break
            del tats[oldest]
        if len(tats) >= self._max_keys:
            tats.popitem(last=False)


def _owed(entry: tuple[int, int], now: int, interval: int) -> int:
    """Return how far ahead of its rate a key is, in the `interval` it is now limited by.

    Counted under a longer interval (a lower limit, since raised), the time owed is re-priced: the
    same number of requests at the new, faster rate.
    """
    tat, counted_in = entry
    owed = tat - now
    return owed * interval // counted_in if interval < counted_in else owed


def _now(clock: Callable[[], float]) -> int:
    # Rounded to the nanosecond first: clocks resolve no finer, and float noise below that must
    # not land an instant on the wrong side of a rate boundary. (+0.5 and int() beat round().)
    return int(clock() * 1e9 + 0.5) * 1_000_000


def _unlimited(limit_per_minute: int) -> Decision:
    if limit_per_minute == 0:
        return UNLIMITED
    raise ValueError(f"limit_per_minute must be >= 0, got {limit_per_minute}")


class FailureCounter:
    """Block a client IP while it has used up its `limit_per_minute` failed authentications.

    A failure is a GCRA hit, so an IP may fail `limit_per_minute` times in a burst and then once
    per `60 / limit_per_minute` seconds; once the allowance is spent, it is blocked until the next
    failure would be allowed again. `limit_per_minute` 0 disables blocking.
    """

    __slots__ = ("_limit", "_limiter")

    def __init__(
        self, limit_per_minute: int, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if limit_per_minute < 0:
            raise ValueError(f"limit_per_minute must be >= 0, got {limit_per_minute}")
        self._limit = limit_per_minute
        self._limiter = RateLimiter(max_keys=max_keys, clock=clock)

    def __len__(self) -> int:
        return len(self._limiter)

    @property
    def limit(self) -> int:
        """Return the failures per minute an IP may make before it is blocked."""
        return self._limit

    async def record_failure(self, ip: str) -> None:
        """Count one failed authentication from `ip`."""
        if self._limit:
            self._limiter.hit(ip, self._limit)

    async def retry_after(self, ip: str) -> float:
        """Return the seconds `ip` stays blocked, 0.0 if it is not blocked."""
        if not self._limit or ip not in self._limiter:  # fast path for the usual, clean IP
            return 0.0
        return self._limiter.peek(ip, self._limit).retry_after

    async def is_blocked(self, ip: str) -> bool:
        """Tell whether requests from `ip` must be refused with 429."""
        return await self.retry_after(ip) > 0.0


class ConcurrencyLimiter:
    """Admit at most `limit` requests in flight at once, refusing (never queueing) the rest; 0 = no cap."""

    __slots__ = ("_in_flight", "_limit")

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self._limit = limit
        self._in_flight = 0

    @property
    def limit(self) -> int:
        """Return the cap on requests in flight (0 = none)."""
        return self._limit

    @property
    def in_flight(self) -> int:
        """Return how many admitted requests have not been released yet."""
        return self._in_flight

    def try_acquire(self) -> bool:
        """Admit one request if under the cap; the caller must `release()` it exactly once."""
        if self._limit and self._in_flight >= self._limit:
            return False
        self._in_flight += 1
        return True

    def release(self) -> None:
        """Mark one admitted request as finished."""
        if self._in_flight <= 0:
            # An unmatched release would silently raise the cap for the rest of the process.
            raise RuntimeError("release() called more times than try_acquire() succeeded")
        self._in_flight -= 1


_GLOBAL_KEY = object()  # the global rate's key: no token id can equal it


def _until_expiry(credential: Credential, now: float) -> str:
    # The quota and budget never refill: Retry-After points at the token's expiry (SDKs are also
    # told not to retry at all).
    return str(max(1, int(credential.expires_at - now)))


class MemoryLimiter:
    """The Limiter of one process: counters on the cached credential, rates in one GCRA table.

    admit() has no await before its last check passes and the quota is counted, so it is exact on
    one event loop however many requests arrive at once.
    """

    def __init__(self, *, global_rate: int, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic, max_keys: int = 100_000) -> None:
        self._rates = RateLimiter(max_keys, monotonic)
        self._global_rate = global_rate
        self._clock = clock

    async def admit(self, credential: Credential, rate_per_minute: int, client_ip: str | None = None) -> Decision:
        # The IP block is IpBlock's to check, before the credential (client_ip is ignored here).
        # A token out of quota or budget must not spend the rate or global allowance either.
        limit = credential.max_requests
        if limit is not None and credential.request_count >= limit:
            raise QuotaExceeded(headers={"Retry-After": _until_expiry(credential, self._clock()),
                                         "x-should-retry": "false"})
        budget = credential.max_tokens_total
        if budget is not None and credential.total_tokens >= budget:
            raise BudgetExceeded(headers={"Retry-After": _until_expiry(credential, self._clock()),
                                          "x-should-retry": "false"})
        rates, global_rate = self._rates, self._global_rate
        # Peek at the global rate before spending the token's, so a denial by one costs nothing of the other.
        if global_rate:
            overall = rates.peek(_GLOBAL_KEY, global_rate)
            if not overall.allowed:
                raise RateLimited("the gateway's global rate limit is exceeded",
                                  headers={**rate_headers(overall), "Retry-After": str(overall.retry_after_seconds)})
        decision = rates.hit(credential.id, rate_per_minute)
        if not decision.allowed:
            raise RateLimited(headers={**rate_headers(decision), "Retry-After": str(decision.retry_after_seconds)})
        if global_rate:
            rates.hit(_GLOBAL_KEY, global_rate)
        credential.request_count += 1
        return decision

    async def refund(self, credential: Credential) -> None:
        credential.request_count -= 1

    def add_usage(self, credential: Credential, prompt: int, completion: int, total: int) -> None:
        """Nothing to do: the budget is checked against the credential's own total, which the cache keeps."""


def rate_headers(decision: Decision) -> dict[str, str]:
    """Return the X-RateLimit-* headers a rate decision implies."""
    return {"X-RateLimit-Limit": str(decision.limit), "X-RateLimit-Remaining": str(decision.remaining)}
