"""What the limiters decide, and the Protocols every backend implements (in memory today, Redis next)."""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

from llm_proxy.errors import ApiError
from llm_proxy.models import Credential


class SharedStateUnavailable(ApiError):
    """A shared backend (Redis) could not be reached: what a limiter raises instead of its driver's errors.

    Answered 503 with Retry-After (REDIS_FAILURE_MODE=closed); a caller that keeps serving instead
    (open) catches this one class, never a backend's own exceptions.
    """
    status, type, code, message = 503, "server_error", "shared_state_unavailable", "shared state is unavailable"


class AddressBlocked(Exception):
    """Raised by a limiter that checks the client IP in the same call as the limits: the IP failed
    authentication too often, and stays blocked `retry_after` seconds (the caller refuses it as the IP
    block does)."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"blocked for {retry_after:.3f} s")
        self.retry_after = retry_after


class Decision(NamedTuple):
    """Outcome of a rate-limit check, with what the `X-RateLimit-*` and `Retry-After` headers need."""

    allowed: bool
    limit: int  # requests per minute; 0 = unlimited (send no rate-limit headers)
    remaining: int  # whole requests that could still be made right now (after this one, for hit)
    retry_after: float  # seconds until a request would be allowed; 0.0 when allowed

    @property
    def retry_after_seconds(self) -> int:
        """Return `retry_after` rounded up to whole seconds for `Retry-After` (≥ 1 when denied)."""
        # Rounding down would invite a retry that is denied again.
        return max(1, math.ceil(self.retry_after)) if not self.allowed else 0


UNLIMITED = Decision(True, 0, 0, 0.0)


class Limiter(Protocol):
    async def admit(self, credential: Credential, rate_per_minute: int, client_ip: str | None = None) -> Decision:
        """Count one request of `credential` against its quota, its budget, its rate (`rate_per_minute`,
        0 = unlimited) and the global rate, all or none.

        With `client_ip`, a limiter that keeps the failed-authentication counts too (the shared one)
        first refuses a blocked IP with AddressBlocked, in the same call; the others ignore it.

        Raise QuotaExceeded, BudgetExceeded or RateLimited, counting nothing, when one refuses it;
        otherwise return the token's rate decision (what its X-RateLimit-* headers say). Exact under
        any concurrency: two requests can never both take the quota's last request.
        """
    async def refund(self, credential: Credential) -> None:
        """Give back the quota of a request admitted just before and refused before it reached the upstream."""
    def add_usage(self, credential: Credential, prompt: int, completion: int, total: int) -> None:
        """Charge a response's token usage where this limiter keeps budgets (after the token cache added it
        to the credential); never blocks the caller."""


class FailureLimiter(Protocol):
    @property
    def limit(self) -> int:
        """Failed authentications a client IP may make per minute before it is blocked (0: never)."""
    async def record_failure(self, ip: str) -> None: ...
    async def retry_after(self, ip: str) -> float:
        """Seconds `ip` stays blocked; 0.0 when it is not."""
