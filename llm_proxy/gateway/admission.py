"""Admission on /v1 and /manage: brute-force blocking per IP, global and per-token rates, quotas, concurrency."""

from __future__ import annotations

import math

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from llm_proxy.audit.writer import AuditWriter
from llm_proxy.errors import ApiError, RateLimited, TooManyRequests
from llm_proxy.keys import CLIENT_IP, RATE_DECISION, REQUEST_ID
from llm_proxy.limiting.memory import Decision, FailureCounter, RateLimiter
from llm_proxy.models import Credential
from llm_proxy.ops.metrics import Metrics
from llm_proxy.tokens.anomaly import AnomalyDetector
from llm_proxy.tokens.cache import TokenCache

_GLOBAL_KEY = "*"


class IpBlock:
    """Refuse an IP that failed authentication too often, before any credential is looked at."""

    def __init__(self, failures: FailureCounter, audit: AuditWriter, metrics: Metrics) -> None:
        self._failures = failures
        self._audit = audit
        self._metrics = metrics

    def check(self, request: web.Request, actor: str) -> None:
        """Raise RateLimited (429) while the request's client IP is blocked; audit the refusal."""
        client_ip = request[CLIENT_IP]
        # Everything from a blocked IP is refused, valid credentials included: answering those
        # normally would keep the oracle a brute-force attack needs.
        wait = self._failures.retry_after(client_ip)
        if wait > 0:
            self._metrics.count_denial("ip_blocked")
            self._audit.emit("auth.failure", actor=actor, result="denied", request_id=request[REQUEST_ID],
                             client_ip=client_ip, details={"http_method": request.method, "endpoint": request.path,
                                                           "reason": "ip_blocked"})
            raise RateLimited("too many failed authentications from this address",
                              headers={"X-RateLimit-Limit": str(self._failures.limit), "X-RateLimit-Remaining": "0",
                                       "Retry-After": str(max(1, math.ceil(wait)))})


def ip_block_middleware(block: IpBlock, actor: str) -> Middleware:
    """Build the middleware running IpBlock.check before the handler (the management API's first step)."""

    @web.middleware
    async def ip_block(request: web.Request, handler: Handler) -> web.StreamResponse:
        block.check(request, actor)
        return await handler(request)

    return ip_block


def _rate_headers(decision: Decision) -> dict[str, str]:
    return {"X-RateLimit-Limit": str(decision.limit), "X-RateLimit-Remaining": str(decision.remaining)}


class Admission:
    """Admit an authenticated /v1 request against its token's quota, budget and rate and the global rate."""

    def __init__(self, store: TokenCache, audit: AuditWriter, metrics: Metrics, anomalies: AnomalyDetector, *,
                 default_rate: int, global_rate: int, limiter: RateLimiter) -> None:
        self._store = store
        self._audit = audit
        self._metrics = metrics
        self._anomalies = anomalies
        self._default_rate = default_rate
        self._global_rate = global_rate
        self._limiter = limiter

    def admit(self, request: web.Request, credential: Credential) -> Decision:
        """Count the request against every limit and return the token's rate decision, or raise 429 (audited)."""
        store, limiter, global_rate = self._store, self._limiter, self._global_rate
        try:
            # A token out of quota or budget must not spend the rate or global allowance either.
            store.check_quota(credential)
            store.check_budget(credential)
            rate = credential.rate_limit_per_minute
            rate = self._default_rate if rate is None else rate
            # Peek at both limits before spending either, so a denial by one costs nothing in the other.
            if global_rate:
                overall = limiter.peek(_GLOBAL_KEY, global_rate)
                if not overall.allowed:
                    raise RateLimited("the gateway's global rate limit is exceeded",
                                      headers={**_rate_headers(overall),
                                               "Retry-After": str(overall.retry_after_seconds)})
            decision = limiter.hit(credential.id, rate)
            if not decision.allowed:
                raise RateLimited(headers={**_rate_headers(decision),
                                           "Retry-After": str(decision.retry_after_seconds)})
            if global_rate:
                limiter.hit(_GLOBAL_KEY, global_rate)
            store.consume(credential)
        except TooManyRequests as exc:
            self._metrics.count_denial(exc.code)
            self.audit_refusal(request, credential, exc)
            raise
        self._anomalies.observe(credential, request[CLIENT_IP])
        return decision

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
        response.headers.update(_rate_headers(decision))
