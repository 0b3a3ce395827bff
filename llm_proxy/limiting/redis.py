"""The limiters shared by every process on one Redis: one Lua script per decision, one round trip each.

What Redis holds, under one key prefix (`llm-proxy:` by default), keyed by token id (never a token
or its digest):

- `usage:<token id>`: a hash of the token's shared counters (requests, prompt, completion, total),
  kept until a day past the token's expiry;
- `rate:<token id>`, `global-rate`, `auth-failures:<client IP>`: GCRA state, gone once idle (at
  most a minute).

The counters are *seeded*: a script that finds no counters key writes the counts the caller's
Credential holds (loaded from the database, or the last shared values a script returned to this
process), then counts on. So a flushed (or restarted, empty) Redis loses, at worst: every rate's
state (each token and the global rate start again with a full burst), each failed-authentication
count, and the requests and tokens other processes counted since this process last saw the
token's counters (the first process to use a token after the flush seeds it with its own view).
Until then, `max_requests` and the budget can be exceeded by that many; the database's totals
lose nothing (below).

Persisting the counters: **the database gets deltas, never absolute values read from Redis.** Each
process adds to the database what it counted itself (+1 per admitted request, -1 per refund, the
usage it added), as it already does for the daily totals. Additions from several processes
commute, so no flush overwrites another's, nothing is counted twice or lost on a clean shutdown,
and the database's total is exactly the sum of what every process served, even across a Redis
flush. Writing the absolute shared value instead would let an older read land after a newer one
(process A reads 20, B reads 25 and writes, A writes 20): the database would go back, and stay
back if A never serves that token again. The shared values read here are for showing fresh numbers
(`/manage`) and for seeding, not for the database.

Times come from the Redis server (`TIME` inside the script), so the processes' clocks never
matter. Rates are integers in units of 100 fs (exact in Lua's doubles over a minute), the clock
resolves a microsecond, and like the in-memory RateLimiter a limit is never enforced more strictly
than stated: a burst is exactly N for any N up to ten million per minute.

Keys of one decision are read together, so this needs one Redis (a primary, with or without
replicas), not Redis Cluster.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from redis.asyncio import Redis
from redis.exceptions import RedisError

from llm_proxy.errors import BudgetExceeded, QuotaExceeded, RateLimited
from llm_proxy.limiting.base import UNLIMITED, AddressBlocked, Decision, SharedStateUnavailable
from llm_proxy.limiting.memory import rate_headers
from llm_proxy.limiting.redis_scripts import Script, ScriptRunner
from llm_proxy.models import Credential

PREFIX = "llm-proxy:"
_UNITS = 10**13  # per second: 100 fs, so a minute (6e14) and twice it stay exact in a double
_WINDOW = 60 * _UNITS
# Counters outlive the token by a day: a stream that ends after the expiry still adds its usage to them.
_COUNTERS_KEPT_PAST_EXPIRY = 86_400

# The GCRA of limiting.memory.RateLimiter, in Lua. A key holds t (µs, when written), d (its debt then,
# in units) and i (the interval it was counted in): its TAT is t + d.
_GCRA = """
local WINDOW = 600000000000000
local PER_US = 10000000
local CAPACITY = WINDOW + PER_US - 1  -- one clock tick of grace, as RateLimiter's _CAPACITY
local PER_MS = 10000000000

local function int(x) return string.format('%d', x) end

local function clock(given)
  if given ~= '' then return tonumber(given) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- How far ahead of its rate the key is at now, priced in interval (a raised limit re-prices it); 0 when idle.
local function owed(key, now, interval)
  local state = redis.call('HMGET', key, 't', 'd', 'i')
  if not state[1] then return 0 end
  local left = tonumber(state[2]) - math.max(0, now - tonumber(state[1])) * PER_US
  if left <= 0 then return 0 end
  local counted_in = tonumber(state[3])
  if interval < counted_in then left = math.floor(left * interval / counted_in) end
  return left
end

local function spend(key, now, debt, interval)
  redis.call('HSET', key, 't', int(now), 'd', int(debt), 'i', int(interval))
  redis.call('PEXPIRE', key, int(math.floor(debt / PER_MS) + 1))  -- past its TAT a key says nothing
end
"""

_COUNTERS = """
local FIELDS = {'requests', 'prompt', 'completion', 'total'}

-- The token's counters, seeded from the caller's counts when the key is missing (first use, or a flush).
local function counters(key, seed)
  if redis.call('EXISTS', key) == 0 then
    redis.call('HSET', key, 'requests', seed[1], 'prompt', seed[2], 'completion', seed[3], 'total', seed[4])
  end
  local c = redis.call('HMGET', key, unpack(FIELDS))
  return {tonumber(c[1]) or 0, tonumber(c[2]) or 0, tonumber(c[3]) or 0, tonumber(c[4]) or 0}
end

local function keep(key, expires_at, now)
  redis.call('EXPIRE', key, int(math.max(60, math.floor(expires_at - now / 1000000) + KEPT_PAST_EXPIRY)))
end
""".replace("KEPT_PAST_EXPIRY", str(_COUNTERS_KEPT_PAST_EXPIRY))

# KEYS: the token's counters, its rate, the global rate, the client IP's failed authentications.
# ARGV: 1-4 the stored counts (the seed), 5 max_requests, 6 max_tokens_total (-1: none), 7 the
# token's interval, 8 the global one (0: no limit), 9 expires_at (s), 10 the failures' interval
# (0: the IP is not checked), 11 now (µs; '' = the server's). Returns {verdict, remaining, retry
# (units), now (µs), requests, prompt, completion, total}; verdict 0 admitted (all of it counted),
# 1 quota, 2 budget, 3 global rate, 4 token rate, 5 the IP is blocked (nothing counted).
_ADMIT = _GCRA + _COUNTERS + """
local now = clock(ARGV[11])
local c = counters(KEYS[1], ARGV)
keep(KEYS[1], tonumber(ARGV[9]), now)
local function answer(verdict, remaining, retry) return {verdict, remaining, retry, now, c[1], c[2], c[3], c[4]} end
-- An IP that failed authentication too often is refused first, as before any credential is looked at.
local failure_interval = tonumber(ARGV[10])
if failure_interval > 0 then
  local failure_debt = owed(KEYS[4], now, failure_interval) + failure_interval
  if failure_debt > CAPACITY then return answer(5, 0, failure_debt - WINDOW) end
end
local max_requests, budget = tonumber(ARGV[5]), tonumber(ARGV[6])
-- A token out of quota or budget spends no rate; a global denial spends nothing of the token's.
if max_requests >= 0 and c[1] >= max_requests then return answer(1, 0, 0) end
if budget >= 0 and c[4] >= budget then return answer(2, 0, 0) end
local token_interval, global_interval = tonumber(ARGV[7]), tonumber(ARGV[8])
local global_debt
if global_interval > 0 then
  global_debt = owed(KEYS[3], now, global_interval) + global_interval
  if global_debt > CAPACITY then return answer(3, 0, global_debt - WINDOW) end
end
local remaining = 0
if token_interval > 0 then
  local debt = owed(KEYS[2], now, token_interval) + token_interval
  if debt > CAPACITY then return answer(4, 0, debt - WINDOW) end
  spend(KEYS[2], now, debt, token_interval)
  remaining = math.floor((CAPACITY - debt) / token_interval)
end
if global_debt then spend(KEYS[3], now, global_debt, global_interval) end
c[1] = redis.call('HINCRBY', KEYS[1], 'requests', 1)
return answer(0, remaining, 0)
"""

# KEYS: the token's counters. ARGV: 1-4 the seed, 5-8 what to add to each, 9 expires_at (s), 10 now
# (µs; '' = the server's). Returns the counters after the addition.
_ADD = _GCRA + _COUNTERS + """
local now = clock(ARGV[10])
counters(KEYS[1], ARGV)
local c = {}
for n, field in ipairs(FIELDS) do c[n] = redis.call('HINCRBY', KEYS[1], field, ARGV[4 + n]) end
keep(KEYS[1], tonumber(ARGV[9]), now)
return c
"""

# KEYS: the counters of several tokens. ARGV: for each, 9 values (the seed 1-4, what to add 5-8, expires_at),
# then now (µs; '' = the server's). Returns the counters of each after the addition, four a token.
_ADD_MANY = _GCRA + _COUNTERS + """
local now = clock(ARGV[#ARGV])
local all = {}
for k, key in ipairs(KEYS) do
  local base = (k - 1) * 9
  counters(key, {ARGV[base + 1], ARGV[base + 2], ARGV[base + 3], ARGV[base + 4]})
  for n, field in ipairs(FIELDS) do all[#all + 1] = redis.call('HINCRBY', key, field, ARGV[base + 4 + n]) end
  keep(key, tonumber(ARGV[base + 9]), now)
end
return all
"""

# KEYS: the IP's failures. ARGV: 1 the interval, 2 'hit' (count one failure if allowed) or 'peek',
# 3 now (µs; '' = the server's). Returns 0 when one more failure is allowed, else the units to wait.
_FAILURE = _GCRA + """
local now = clock(ARGV[3])
local interval = tonumber(ARGV[1])
local debt = owed(KEYS[1], now, interval) + interval
if debt > CAPACITY then return debt - WINDOW end
if ARGV[2] == 'hit' then spend(KEYS[1], now, debt, interval) end
return 0
"""

_ADMIT_SCRIPT, _ADD_SCRIPT, _ADD_MANY_SCRIPT, _FAILURE_SCRIPT = map(Script.of, (_ADMIT, _ADD, _ADD_MANY, _FAILURE))
_ADMITTED, _QUOTA, _BUDGET, _GLOBAL_RATE, _IP_BLOCKED = 0, 1, 2, 3, 5


class Counters(NamedTuple):
    """A token's shared counters as Redis holds them."""

    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def _interval(limit_per_minute: int) -> int:
    """Return the emission interval of a limit in units, rounded down (never stricter than stated); 0 = none."""
    if limit_per_minute < 0:
        raise ValueError(f"limit_per_minute must be >= 0, got {limit_per_minute}")
    if limit_per_minute == 0:
        return 0
    return _WINDOW // limit_per_minute or 1


class RedisLimiter:
    """The Limiter of processes sharing one Redis: quota, budget, token rate and global rate in one script.

    Semantics are MemoryLimiter's, to the header. Each call sets the Credential's counters to the
    shared ones the script returns, so `/manage` shows fresh numbers and a flushed Redis is seeded
    with this process's latest view. `clock` (seconds) replaces the server's time, for tests only.
    """

    def __init__(self, client: Redis, *, global_rate: int, failure_limit: int = 0, prefix: str = PREFIX,
                 clock: Callable[[], float] | None = None) -> None:
        self._client = client
        self._global_rate = global_rate
        self._global_interval = _interval(global_rate)
        self._failure_interval = _interval(failure_limit)
        self._prefix = prefix
        self._scripts = ScriptRunner(client, clock)

    async def admit(self, credential: Credential, rate_per_minute: int, client_ip: str | None = None) -> Decision:
        """Limiter.admit; with `client_ip`, also refuse (AddressBlocked) an IP that failed authentication too
        often, in the same round trip (RedisFailureLimiter's allowance, `failure_limit` a minute)."""
        token_interval = _interval(rate_per_minute)
        failure_interval = self._failure_interval if client_ip is not None else 0
        reply = await self._scripts.run(
            _ADMIT_SCRIPT,
            (self._usage_key(credential.id), self._prefix + "rate:" + credential.id, self._prefix + "global-rate",
             self._prefix + "auth-failures:" + (client_ip or "")),
            (*_seed(credential), _limit_argument(credential.max_requests),
             _limit_argument(credential.max_tokens_total), token_interval, self._global_interval,
             repr(credential.expires_at), failure_interval))
        verdict, remaining, retry, now_us, *counts = (int(value) for value in reply)
        _take(credential, counts)
        if verdict == _IP_BLOCKED:
            raise AddressBlocked(retry / _UNITS)
        if verdict == _ADMITTED:
            return Decision(True, rate_per_minute, remaining, 0.0) if rate_per_minute else UNLIMITED
        if verdict in (_QUOTA, _BUDGET):
            # The quota and budget never refill: Retry-After points at the token's expiry (SDKs are
            # also told not to retry at all).
            headers = {"Retry-After": str(max(1, int(credential.expires_at - now_us / 1e6))),
                       "x-should-retry": "false"}
            raise QuotaExceeded(headers=headers) if verdict == _QUOTA else BudgetExceeded(headers=headers)
        if verdict == _GLOBAL_RATE:
            overall = Decision(False, self._global_rate, 0, retry / _UNITS)
            raise RateLimited("the gateway's global rate limit is exceeded",
                              headers={**rate_headers(overall), "Retry-After": str(overall.retry_after_seconds)})
        decision = Decision(False, rate_per_minute, 0, retry / _UNITS)
        raise RateLimited(headers={**rate_headers(decision), "Retry-After": str(decision.retry_after_seconds)})

    async def refund(self, credential: Credential) -> None:
        await self._change(credential, (-1, 0, 0, 0))

    async def add_usage(self, credential: Credential, prompt: int, completion: int, total: int) -> None:
        """Add a response's token usage to the token's shared counters (what its budget is checked against)."""
        await self._change(credential, (0, prompt, completion, total))

    async def add_usages(self, usages: Sequence[tuple[Credential, int, int, int]]) -> None:
        """Add the usage of several answers (credential, prompt, completion, total) in one round trip; one
        credential may appear once only."""
        if not usages:
            return
        arguments: list[str | int] = []
        for credential, prompt, completion, total in usages:
            arguments += [*_seed(credential), 0, prompt, completion, total, repr(credential.expires_at)]
        reply = await self._scripts.run(_ADD_MANY_SCRIPT, [self._usage_key(credential.id) for credential, *_ in usages],
                                        arguments)
        for index, (credential, *_) in enumerate(usages):
            _take(credential, [int(value) for value in reply[4 * index:4 * index + 4]])

    async def counters(self, token_ids: Sequence[str]) -> dict[str, Counters]:
        """Read the shared counters of these tokens in one round trip; tokens Redis holds none for are left out."""
        if not token_ids:
            return {}
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for token_id in token_ids:
                    pipe.hmget(self._usage_key(token_id), "requests", "prompt", "completion", "total")
                replies = await pipe.execute()
        except RedisError as exc:
            raise SharedStateUnavailable(headers={"Retry-After": "1"}) from exc
        return {token_id: Counters(*(int(value) for value in reply))
                for token_id, reply in zip(token_ids, replies, strict=True) if None not in reply}

    async def _change(self, credential: Credential, deltas: tuple[int, int, int, int]) -> None:
        reply = await self._scripts.run(_ADD_SCRIPT, (self._usage_key(credential.id),),
                                        (*_seed(credential), *deltas, repr(credential.expires_at)))
        _take(credential, [int(value) for value in reply])

    def _usage_key(self, token_id: str) -> str:
        return self._prefix + "usage:" + token_id


def _limit_argument(limit: int | None) -> int:
    return -1 if limit is None else limit


def _seed(credential: Credential) -> tuple[int, int, int, int]:
    return (credential.request_count, credential.prompt_tokens, credential.completion_tokens,
            credential.total_tokens)


def _take(credential: Credential, counts: Sequence[int]) -> None:
    (credential.request_count, credential.prompt_tokens, credential.completion_tokens,
     credential.total_tokens) = counts


class RedisFailureLimiter:
    """The FailureLimiter of processes sharing one Redis: one allowance of failed authentications per IP.

    FailureCounter's GCRA, shared: an IP may fail `limit_per_minute` times in a burst, across all
    processes together, and then once per `60 / limit_per_minute` seconds. The key holds the IP as
    given (an address is no secret, and hashing the 32-bit IPv4 space would hide nothing); it expires
    once the IP's failures are forgotten, within a minute. `clock` replaces the server's time, for tests.
    """

    def __init__(self, client: Redis, limit_per_minute: int, *, prefix: str = PREFIX,
                 clock: Callable[[], float] | None = None) -> None:
        self._limit = limit_per_minute
        self._interval = _interval(limit_per_minute)
        self._prefix = prefix
        self._scripts = ScriptRunner(client, clock)

    @property
    def limit(self) -> int:
        """Return the failures per minute an IP may make before it is blocked."""
        return self._limit

    async def record_failure(self, ip: str) -> None:
        """Count one failed authentication from `ip`."""
        if self._limit:
            await self._scripts.run(_FAILURE_SCRIPT, (self._prefix + "auth-failures:" + ip,), (self._interval, "hit"))

    async def retry_after(self, ip: str) -> float:
        """Return the seconds `ip` stays blocked, 0.0 if it is not blocked."""
        if not self._limit:
            return 0.0
        units = await self._scripts.run(_FAILURE_SCRIPT, (self._prefix + "auth-failures:" + ip,),
                                        (self._interval, "peek"))
        return int(units) / _UNITS

    async def is_blocked(self, ip: str) -> bool:
        """Tell whether requests from `ip` must be refused with 429."""
        return await self.retry_after(ip) > 0.0
