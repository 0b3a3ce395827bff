"""Limits shared through Redis, and what each process does while Redis cannot be reached.

One SharedState per process follows whether Redis answers. The first failed call opens an
*episode*: the state says so once (the app logs it, audits `system.degraded`, and tells the token
cache to re-read tokens), and a probe pings Redis twice a second until it answers again, which
closes the episode (`system.recovered`; the cache drops every cached token, since changes may have
been missed). While an episode lasts nothing waits on Redis: proxying either refuses at once
(REDIS_FAILURE_MODE=closed: 503 `shared_state_unavailable`) or counts on this process's own
limiters (open). Failed authentications always fall back to being counted per process: a throttle
that is only per process still slows a brute force, and refusing the management API because Redis
is down would help nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from llm_proxy.limiting.base import AddressBlocked, Decision, FailureLimiter, Limiter, SharedStateUnavailable
from llm_proxy.limiting.redis import RedisFailureLimiter, RedisLimiter
from llm_proxy.models import Credential

log = logging.getLogger(__name__)

PROBE_INTERVAL = 0.5
# Usage is added to the shared counters this long after an answer, with every other answer's of the
# moment in the same round trip: under load, far less than one round trip per request.
USAGE_DELAY = 0.02


def unavailable() -> SharedStateUnavailable:
    """The 503 a request gets while shared state cannot be reached and proxying fails closed."""
    return SharedStateUnavailable(headers={"Retry-After": "1"})


class SharedState:
    """Whether this process can reach Redis: episodes of unavailability, opened by a failure, closed by a probe.

    `on_change(available, reason)` is called once when an episode opens (False) and once when it
    closes (True); `on_error()` for every failed call (the metric). `ping` is the probe's call.
    """

    def __init__(self, ping: Callable[[], Awaitable[object]], *, on_change: Callable[[bool, str], None],
                 on_error: Callable[[], None], probe_interval: float = PROBE_INTERVAL) -> None:
        self._ping = ping
        self._on_change = on_change
        self._on_error = on_error
        self._probe_interval = probe_interval
        self._probe: asyncio.Task[None] | None = None
        self.available = True

    def failed(self, error: BaseException) -> None:
        """Note a failed call: count it, and open an episode (and its probe) if none is open."""
        self._on_error()
        if not self.available:
            return
        self.available = False
        cause = error.__cause__ or error
        self._on_change(False, f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__)
        self._probe = asyncio.ensure_future(self._wait_for_redis())

    def recovered(self) -> None:
        """Close the episode (the probe, or another caller, found Redis answering again)."""
        if self.available:
            return
        self.available = True
        self._on_change(True, "")

    async def _wait_for_redis(self) -> None:
        while not self.available:
            await asyncio.sleep(self._probe_interval)
            try:
                await self._ping()
            except Exception:  # noqa: S112 (every way of not answering means: not yet)
                continue
            self.recovered()

    async def close(self) -> None:
        """Stop the probe."""
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe


class SharedLimiter:
    """The Limiter of a process sharing Redis: RedisLimiter while it answers; else refuse, or count locally.

    `fail_open` is REDIS_FAILURE_MODE=open: during an episode the per-process MemoryLimiter decides,
    on the counters this process last saw. Usage is added to the shared counters off the request's
    path, batched (see add_usage); while Redis is unreachable it is counted in the database only (a
    budget then lags by what was spent meanwhile).
    """

    def __init__(self, shared: RedisLimiter, local: Limiter, local_failures: FailureLimiter, state: SharedState, *,
                 fail_open: bool, usage_delay: float = USAGE_DELAY) -> None:
        self._shared = shared
        self._local = local
        self._local_failures = local_failures
        self._state = state
        self._fail_open = fail_open
        self._usage_delay = usage_delay
        # token id -> [credential, prompt, completion, total] answered and not yet added to the shared counters
        self._usage: dict[str, list[Any]] = {}
        self._sending: asyncio.Task[None] | None = None
        self._send_now = asyncio.Event()  # set by close(): send without waiting

    async def admit(self, credential: Credential, rate_per_minute: int, client_ip: str | None = None) -> Decision:
        """Limiter.admit; with `client_ip`, the IP's failed authentications are checked in the same round trip."""
        if self._state.available:
            try:
                return await self._shared.admit(credential, rate_per_minute, client_ip)
            except SharedStateUnavailable as exc:
                self._state.failed(exc)
        if not self._fail_open:
            raise unavailable()
        if client_ip is not None:
            wait = await self._local_failures.retry_after(client_ip)
            if wait > 0:
                raise AddressBlocked(wait)
        return await self._local.admit(credential, rate_per_minute)

    async def refund(self, credential: Credential) -> None:
        if self._state.available:
            try:
                await self._shared.refund(credential)
                return
            except SharedStateUnavailable as exc:
                self._state.failed(exc)
        await self._local.refund(credential)

    def add_usage(self, credential: Credential, prompt: int, completion: int, total: int) -> None:
        """Add a response's usage to the token's shared counters: within `usage_delay` (20 ms), together with
        every other answer's of that moment, in one round trip."""
        if not self._state.available or not (prompt or completion or total):
            return
        pending = self._usage.get(credential.id)
        if pending is None:
            self._usage[credential.id] = [credential, prompt, completion, total]
        else:
            pending[1] += prompt
            pending[2] += completion
            pending[3] += total
        if self._sending is None:
            self._sending = asyncio.ensure_future(self._send_usage())

    async def _send_usage(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._send_now.wait(), self._usage_delay)
        usage, self._usage = self._usage, {}
        self._sending = None
        try:
            await self._shared.add_usages([(credential, prompt, completion, total)
                                           for credential, prompt, completion, total in usage.values()])
        except SharedStateUnavailable as exc:
            self._state.failed(exc)

    async def close(self) -> None:
        """Send the usage still waiting, at once (one round trip)."""
        sending = self._sending
        if sending is not None:
            self._send_now.set()
            await sending


class SharedFailureLimiter:
    """The FailureLimiter of a process sharing Redis: one allowance per IP across processes while Redis
    answers, this process's own count (`local`) during an episode."""

    def __init__(self, shared: RedisFailureLimiter, local: FailureLimiter, state: SharedState) -> None:
        self._shared = shared
        self._local = local
        self._state = state

    @property
    def limit(self) -> int:
        return self._shared.limit

    async def record_failure(self, ip: str) -> None:
        await self._local.record_failure(ip)  # kept too: it decides during an episode
        if self._state.available:
            try:
                await self._shared.record_failure(ip)
            except SharedStateUnavailable as exc:
                self._state.failed(exc)

    async def retry_after(self, ip: str) -> float:
        if self._state.available:
            try:
                return await self._shared.retry_after(ip)
            except SharedStateUnavailable as exc:
                self._state.failed(exc)
        return await self._local.retry_after(ip)
