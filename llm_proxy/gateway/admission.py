"""Admission on /v1 and /manage: brute-force blocking per IP, global and per-token rates, quotas, concurrency."""

from __future__ import annotations

import math

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from llm_proxy.audit.events import Actor
from llm_proxy.audit.writer import AuditWriter
from llm_proxy.errors import ApiError, RateLimited, TooManyRequests
from llm_proxy.gateway.context import CLIENT_IP, REQUEST_ID
from llm_proxy.limiting.base import Decision, FailureLimiter, Limiter
from llm_proxy.limiting.memory import rate_headers
from llm_proxy.models import Credential
from llm_proxy.ops.metrics import Metrics
from llm_proxy.tokens.anomaly import AnomalyDetector
from llm_proxy.tokens.cache import TokenCache

# The token's rate decision, for the X-RateLimit-* headers of an admitted request.
RATE_DECISION: web.RequestKey[Decision] = web.RequestKey("rate_decision")


class IpBlock:
    """Refuse an IP that failed authentication too often, before any credential is looked at."""

    def __init__(self, failures: FailureLimiter, audit: AuditWriter, metrics: Metrics) -> None:
        self._failures = failures
        self._audit = audit
        self._metrics = metrics

    async def check(self, request: web.Request, actor: Actor) -> None:
        """Raise RateLimited (429) while the request's client IP is blocked; audit the refusal."""
        # Everything from a blocked IP is refused, valid credentials included: answering those
        # normally would keep the oracle a brute-force attack needs.
        wait = await self._failures.retry_after(request[CLIENT_IP])
        if wait > 0:
            raise self.refusal(request, actor, wait)

    def refusal(self, request: web.Request, actor: Actor, wait: float) -> RateLimited:
        """Count and audit the refusal of a blocked IP; return the 429 to raise."""
        self._metrics.count_denial("ip_blocked")
        self._audit.emit("auth.failure", actor=actor, result="denied", request_id=request[REQUEST_ID],
                         client_ip=request[CLIENT_IP], details={"http_method": request.method,
                                                                "endpoint": request.path, "reason": "ip_blocked"})
        return RateLimited("too many failed authentications from this address",
                           headers={"X-RateLimit-Limit": str(self._failures.limit), "X-RateLimit-Remaining": "0",
                                    "Retry-After": str(max(1, math.ceil(wait)))})


def ip_block_middleware(block: IpBlock, actor: Actor) -> Middleware:
    """Build the middleware running IpBlock.check before the handler (the management API's first step)."""

    @web.middleware
    async def ip_block(request: web.Request, handler: Handler) -> web.StreamResponse:
        await block.check(request, actor)
        return await handler(request)

    return ip_block


class Admission:
    """Admit an authenticated /v1 request against its token's quota, budget and rate and the global rate."""

    def __init__(self, limiter: Limiter, cache: TokenCache, audit: AuditWriter, metrics: Metrics,
                 anomalies: AnomalyDetector, *, default_rate: int, checks_addresses: bool = False) -> None:
        self._limiter = limiter
        # The limiter refuses blocked IPs itself, in the same call (AddressBlocked): the shared one.
        self.checks_addresses = checks_addresses
        self._cache = cache
        self._audit = audit
        self._metrics = metrics
        self._anomalies = anomalies
        self._default_rate = default_rate

    async def admit(self, request: web.Request, credential: Credential) -> Decision:
        """Count the request against every limit and return the token's rate decision, or raise 429 (audited)."""
        rate = credential.rate_limit_per_minute
        try:
            decision = await self._limiter.admit(credential, self._default_rate if rate is None else rate,
                                                 request[CLIENT_IP] if self.checks_addresses else None)
        except TooManyRequests as exc:
            self._metrics.count_denial(exc.code)
            self.audit_refusal(request, credential, exc)
            raise
        self._cache.record_request(credential)
        self._anomalies.observe(credential, request[CLIENT_IP])
        return decision

    def add_usage(self, credential: Credential, prompt: int, completion: int, total: int) -> None:
        """Charge an answered request's token usage to its token (what its budget is checked against)."""
        self._cache.add_usage(credential, prompt, completion, total)
        self._limiter.add_usage(credential, prompt, completion, total)

    async def refund(self, credential: Credential) -> None:
        """Give back the quota of an admitted request the gateway refused before it reached the upstream."""
        await self._limiter.refund(credential)
        self._cache.record_refund(credential)

    def audit_refusal(self, request: web.Request, credential: Credential, exc: ApiError) -> None:
        """Audit a request turned away by a limit: its one token.access event, `denied`."""
        self._audit.emit("token.access", actor="client", result="denied", project_id=credential.project.id,
                         request_id=request[REQUEST_ID], client_ip=request[CLIENT_IP],
                         details={"http_method": request.method, "endpoint": request.path,
                                  "status": exc.status, "reason": exc.code, "token_id": credential.hint,
                                  "user_agent": request.headers.get("User-Agent")})


def add_rate_limit_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Put X-RateLimit-* on every admitted proxied response, streamed ones included (a response hook step)."""
    decision = request.get(RATE_DECISION)
    if decision is not None:
        response.headers.update(rate_headers(decision))
