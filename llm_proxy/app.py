"""Assemble the gateway: one application, its middlewares in one order, every resource in a cleanup context."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from .anomaly import AnomalyDetector
from .audit import AuditWriter
from .auth import ManagementTokens, management_auth_middleware, token_auth_middleware
from .cors import cors_headers, cors_middleware
from .crypto import KeyRing
from .database import Database
from .errors import error_middleware
from .forwarder import Forwarder
from .health import health_routes
from .housekeeping import ExpiryJob
from .keys import ANOMALIES, AUDIT, DATABASE, EXPIRY_JOB, KEYRING, SETTINGS, TOKEN_STORE
from .limits import add_rate_limit_headers, admission_middleware, ip_block_middleware
from .management import Management
from .metrics import Metrics, metrics_middleware, metrics_route
from .ratelimit import ConcurrencyLimiter, FailureCounter, RateLimiter
from .request_context import add_request_id_header, request_context_middleware
from .security_headers import response_hook, security_headers
from .settings import Settings
from .tokenstore import TokenStore

# Given to the server runner by `serve`: a connection that has not delivered a complete request
# within this many seconds of opening (or of its previous response) is closed, so a client that
# sends its headers byte by byte cannot pin a connection. Slow bodies are bounded by REQUEST_TIMEOUT.
CONNECTION_IDLE_TIMEOUT = 75.0


def create_app(settings: Settings, *, clock: Callable[[], float] = time.time,
               monotonic: Callable[[], float] = time.monotonic) -> web.Application:
    """Build the application; nothing is opened until it starts (clocks are injectable for tests)."""
    keyring = KeyRing(settings.encryption_key, settings.encryption_keys_previous)
    db = Database(settings.database_path)
    store = TokenStore(db, keyring, clock)
    audit = AuditWriter(db, enabled=settings.audit_enabled, file_path=settings.audit_log_file,
                        create_dir=settings.audit_create_dir, store_in_db=settings.audit_store_in_db,
                        mask_client_ip=settings.audit_mask_client_ip)
    concurrency = ConcurrencyLimiter(settings.max_concurrent_requests)
    metrics = Metrics(audit, concurrency)
    forwarder = Forwarder(settings, store, audit, metrics)
    management = Management(settings, db, keyring, store, audit, clock)
    anomalies = AnomalyDetector(max_ips_per_hour=settings.anomaly_max_ips_per_hour,
                                rate_factor=settings.anomaly_rate_factor, auto_suspend=settings.anomaly_auto_suspend,
                                db=db, store=store, audit=audit, clock=clock)
    expiry = ExpiryJob(db, store, audit, clock)

    # The one place the middleware order is decided. Outermost first:
    # 1. request context: every later layer, and every error body and audit event, needs the
    #    request id and the resolved client IP;
    # 2. metrics: outside the error middleware, so it counts the status the client really gets;
    # 3. CORS preflight: answered before any sub-application's credential check (a browser
    #    preflight never carries Authorization); CORS headers on real responses come from a
    #    response hook, because only a hook reaches streamed responses;
    # 4. errors: whatever is raised below (auth, limits, forwarder) becomes an OpenAI error body.
    # The sub-applications add their own credential check inside these: the management token
    # for /manage, client tokens for /v1 (so neither can be used on the other's routes).
    cors = bool(settings.cors_allowed_origins)  # without CORS, neither layer runs at all
    app = web.Application(middlewares=[request_context_middleware(settings.trusted_proxies),
                                       metrics_middleware(metrics),
                                       *([cors_middleware(settings.cors_allowed_origins)] if cors else []),
                                       error_middleware],
                          client_max_size=settings.max_request_size)
    app[SETTINGS], app[KEYRING], app[DATABASE], app[TOKEN_STORE], app[AUDIT] = settings, keyring, db, store, audit
    app[ANOMALIES], app[EXPIRY_JOB] = anomalies, expiry
    # One response hook, run for every response (streamed and error ones included), in these
    # steps; X-RateLimit-* only appear where admission recorded a decision (/v1).
    app.on_response_prepare.append(response_hook(
        add_request_id_header,
        *([cors_headers(settings.cors_allowed_origins)] if cors else []),
        security_headers(hsts_max_age=settings.hsts_max_age if settings.tls_cert_file else None),
        add_rate_limit_headers))
    management_tokens = ManagementTokens(settings.management_tokens)
    app.add_routes([*health_routes(db), metrics_route(metrics, management_tokens, settings.management_allowed_ips)])

    # Inside each sub-application: an IP that failed authentication too often is refused before
    # its credential is even looked at; then the credential; then (for /v1) rate, quota and capacity.
    failures = FailureCounter(settings.ip_rate_limit, clock=monotonic)
    manage = web.Application(middlewares=[
        ip_block_middleware(failures, audit, metrics, "management"),
        management_auth_middleware(management_tokens, settings.management_allowed_ips, audit, failures)])
    manage.add_routes(management.routes())
    app.add_subapp("/manage", manage)

    proxy = web.Application(middlewares=[
        ip_block_middleware(failures, audit, metrics, "client"),
        token_auth_middleware(store, audit, failures, anomalies),
        admission_middleware(store, audit, metrics, anomalies, default_rate=settings.rate_limit_per_minute,
                             global_rate=settings.global_rate_limit, concurrency=concurrency,
                             limiter=RateLimiter(clock=monotonic))])
    proxy.router.add_route("*", "/{tail:.*}", forwarder.handle)
    app.add_subapp("/v1", proxy)

    # Started in this order, torn down in reverse: the upstream session closes first, then
    # counters are flushed and the audit queue drained, and the database closes last.
    app.cleanup_ctx.extend([_database(db), _audit(audit), _token_store(store), _jobs(expiry, anomalies),
                            _upstream(forwarder, settings.max_concurrent_requests)])
    return app


def _database(db: Database) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        await db.connect()
        yield
        await db.close()
    return ctx


def _audit(audit: AuditWriter) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        await audit.start()
        yield
        await audit.close()
    return ctx


def _token_store(store: TokenStore) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        store.start()
        yield
        await store.close()
    return ctx


def _jobs(expiry: ExpiryJob, anomalies: AnomalyDetector) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        expiry.start()
        yield
        await expiry.close()
        await anomalies.close()
    return ctx


def _upstream(forwarder: Forwarder, max_connections: int) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        forwarder.session = forwarder.new_session(max_connections)
        yield
        await forwarder.session.close()
    return ctx
