"""Admission on /v1 and /manage: brute-force blocking per IP, global and per-token rates, quotas, concurrency."""

from __future__ import annotations

import math

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .anomaly import AnomalyDetector
from .audit import AuditWriter
from .errors import Overloaded, RateLimited, TooManyRequests
from .keys import CLIENT_IP, CREDENTIAL, RATE_DECISION, REQUEST_ID
from .metrics import Metrics
from .ratelimit import ConcurrencyLimiter, Decision, FailureCounter, RateLimiter
from .tokenstore import TokenStore

_GLOBAL_KEY = "*"


def ip_block_middleware(failures: FailureCounter, audit: AuditWriter, metrics: Metrics, actor: str) -> Middleware:
    """Build the middleware refusing an IP that failed authentication too often, before any credential check."""

    @web.middleware
    async def ip_block(request: web.Request, handler: Handler) -> web.StreamResponse:
        client_ip = request[CLIENT_IP]
        # Everything from a blocked IP is refused, valid credentials included: answering those
        # normally would keep the oracle a brute-force attack needs.
        wait = failures.retry_after(client_ip)
        if wait > 0:
            metrics.count_denial("ip_blocked")
            audit.emit("auth.failure", actor=actor, result="denied", request_id=request[REQUEST_ID],
                       client_ip=client_ip, details={"http_method": request.method, "endpoint": request.path,
                                                     "reason": "ip_blocked"})
            raise RateLimited("too many failed authentications from this address",
                              headers={"Retry-After": str(max(1, math.ceil(wait)))})
        return await handler(request)

    return ip_block


def _rate_headers(decision: Decision) -> dict[str, str]:
    return {"X-RateLimit-Limit": str(decision.limit), "X-RateLimit-Remaining": str(decision.remaining)}


def admission_middleware(store: TokenStore, audit: AuditWriter, metrics: Metrics, anomalies: AnomalyDetector, *,
                         default_rate: int,
                         global_rate: int,
                         concurrency: ConcurrencyLimiter, limiter: RateLimiter) -> Middleware:
    """Build the middleware that admits an authenticated /v1 request or answers 429/503."""

    @web.middleware
    async def admission(request: web.Request, handler: Handler) -> web.StreamResponse:
        credential = request[CREDENTIAL]
        # Capacity first: a request turned away with 503 must not cost the token quota or rate.
        if not concurrency.try_acquire():
            metrics.count_denial("overloaded")
            raise Overloaded(headers={"Retry-After": "1"})
        try:
            try:
                # A token out of quota or budget must not spend the rate or global allowance either.
                store.check_quota(credential)
                store.check_budget(credential)
                rate = credential.rate_limit_per_minute
                rate = default_rate if rate is None else rate
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
                metrics.count_denial(exc.code)
                audit.emit("token.access", actor="client", result="denied", project_id=credential.project.id,
                           request_id=request[REQUEST_ID], client_ip=request[CLIENT_IP],
                           details={"http_method": request.method, "endpoint": request.path,
                                    "status": exc.status, "reason": exc.code, "token_id": credential.hint,
                                    "user_agent": request.headers.get("User-Agent")})
                raise
            anomalies.observe(credential, request[CLIENT_IP])
            if decision.limit:
                request[RATE_DECISION] = decision
            return await handler(request)
        finally:
            concurrency.release()

    return admission


def add_rate_limit_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Put X-RateLimit-* on every admitted proxied response, streamed ones included (a response hook step)."""
    decision = request.get(RATE_DECISION)
    if decision is not None:
        response.headers.update(_rate_headers(decision))
