"""Flag tokens that behave like leaked ones: too many client IPs, a sudden burst, replays of dead tokens.

Three explainable rules, evaluated in memory on every request (no database read):
  * ``too_many_ips``: more distinct client IPs in the last hour than ANOMALY_MAX_IPS_PER_HOUR;
  * ``rate_spike``: requests in the last 60 seconds above ANOMALY_RATE_FACTOR × the token's average
    per minute over the hour before (only once the token has an hour of history, and never for
    fewer than ANOMALY_RATE_FACTOR requests a minute);
  * ``dead_token_replay``: REPLAY_THRESHOLD attempts within an hour with a revoked or expired token.
Each rule flags a token at most once an hour: a ``token.anomaly`` audit event (actor ``system``) and,
with ANOMALY_AUTO_SUSPEND, deactivation of a live token (``token.suspend``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from llm_proxy.audit.events import Result
from llm_proxy.audit.writer import AuditWriter
from llm_proxy.models import Credential
from llm_proxy.tokens.service import TokenService

log = logging.getLogger(__name__)

HOUR = 3600.0
_WINDOW = 60  # seconds the rate_spike rule looks back
REPLAY_THRESHOLD = 3
_MAX_TRACKED = 100_000  # tokens watched at once; the least recently seen are forgotten first


@dataclass(slots=True)
class _Watch:
    first_seen: float
    ips: dict[str, float] = field(default_factory=dict)     # client IP -> last seen
    minutes: dict[int, int] = field(default_factory=dict)   # minute number -> requests
    # The last 60 seconds, one count per second in a ring (exact to the second, fixed size): a burst
    # straddling a minute boundary counts whole, and a hammered token costs no more memory.
    seconds: list[int] = field(default_factory=lambda: [0] * _WINDOW)
    second: int = 0          # the newest second counted in the ring
    last_60s: int = 0        # the sum of the ring
    replays: list[float] = field(default_factory=list)
    flagged: dict[str, float] = field(default_factory=dict)  # rule -> when it last fired
    # The hour before the current minute only changes when the minute does: its average is
    # computed once a minute, not on every request of a busy token.
    average_minute: int = -1
    average: float = 0.0


class AnomalyDetector:
    """Watch each token's traffic and flag the patterns above."""

    def __init__(self, *, max_ips_per_hour: int, rate_factor: float, auto_suspend: bool,
                 service: TokenService, audit: AuditWriter, clock: Callable[[], float] = time.time) -> None:
        self._max_ips = max_ips_per_hour
        self._factor = rate_factor
        self._auto_suspend = auto_suspend
        self._service = service
        self._audit = audit
        self._clock = clock
        self._watches: OrderedDict[str, _Watch] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()

    def _watch(self, token_id: str, now: float) -> _Watch:
        watch = self._watches.get(token_id)
        if watch is None:
            watch = self._watches[token_id] = _Watch(first_seen=now)
            if len(self._watches) > _MAX_TRACKED:
                self._watches.popitem(last=False)
        else:
            self._watches.move_to_end(token_id)
        return watch

    def observe(self, credential: Credential, client_ip: str) -> None:
        """Note an admitted request and flag the token if it now looks abused."""
        now = self._clock()
        watch = self._watch(credential.id, now)
        watch.ips[client_ip] = now
        minute = int(now // 60)
        watch.minutes[minute] = watch.minutes.get(minute, 0) + 1
        second, ring = int(now), watch.seconds
        if second != watch.second:
            if second - watch.second >= _WINDOW:
                ring[:] = [0] * _WINDOW
                watch.last_60s = 0
            else:
                for passed in range(watch.second + 1, second + 1):  # the seconds that left the window
                    watch.last_60s -= ring[passed % _WINDOW]
                    ring[passed % _WINDOW] = 0
            watch.second = second
        ring[second % _WINDOW] += 1
        watch.last_60s += 1
        if len(watch.ips) > self._max_ips:
            for ip, seen in list(watch.ips.items()):
                if seen <= now - HOUR:
                    del watch.ips[ip]
            if len(watch.ips) > self._max_ips:
                self._flag(credential, watch, "too_many_ips", now, distinct_ips=len(watch.ips),
                           limit=self._max_ips)
        current = watch.last_60s
        if current > self._factor:
            if watch.average_minute != minute:
                for old in [m for m in watch.minutes if m < minute - 60]:
                    del watch.minutes[old]
                watch.average_minute = minute
                watch.average = sum(count for m, count in watch.minutes.items() if m < minute) / 60
            previous = watch.average
            if current > self._factor * max(previous, 1.0) and now - watch.first_seen >= HOUR:
                self._flag(credential, watch, "rate_spike", now, requests_last_minute=current,
                           average_per_minute=round(previous, 2))
        elif len(watch.minutes) > 61:
            for old in [m for m in watch.minutes if m < minute - 60]:
                del watch.minutes[old]

    def observe_dead_token(self, credential: Credential, client_ip: str, reason: str) -> None:
        """Note an attempt with a revoked or expired token: repeated, it suggests a leaked one."""
        now = self._clock()
        watch = self._watch(credential.id, now)
        watch.replays = [at for at in watch.replays if at > now - HOUR]
        watch.replays.append(now)
        if len(watch.replays) >= REPLAY_THRESHOLD:
            self._flag(credential, watch, "dead_token_replay", now, client_ip=client_ip,
                       attempts_last_hour=len(watch.replays), token_state=reason)

    def _flag(self, credential: Credential, watch: _Watch, rule: str, now: float, *,
              client_ip: str | None = None, **details: object) -> None:
        last = watch.flagged.get(rule)
        if last is not None and last > now - HOUR:
            return
        watch.flagged[rule] = now
        # Only a live token is suspended: a revoked or expired one is refused anyway, and a
        # token.suspend for it would only mislead whoever reads the audit log.
        suspend = (self._auto_suspend and credential.is_active and not credential.revoked
                   and credential.expires_at > now)
        self._audit.emit("token.anomaly", actor="system", result="denied" if suspend else "success",
                         # The event's own client_ip field, never details: the writer masks only that one
                         # (AUDIT_MASK_CLIENT_IP).
                         project_id=credential.project.id, client_ip=client_ip,
                         details={"reason": rule, "token_id": credential.hint, "auto_suspend": suspend, **details})
        if suspend:
            # Takes effect on the very next request; the database write follows off the request path.
            task = asyncio.get_running_loop().create_task(self._suspend(credential, rule,
                                                                        self._service.suspend(credential.id)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _suspend(self, credential: Credential, rule: str, write: Awaitable[object]) -> None:
        try:
            await write
            result: Result = "success"
        except Exception:
            log.exception("could not persist the suspension of a token")
            result = "error"
        self._audit.emit("token.suspend", actor="system", result=result, project_id=credential.project.id,
                         details={"reason": rule, "token_id": credential.hint})

    async def close(self) -> None:
        """Wait for suspensions still being written."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
