"""Assemble the gateway: one application, its middlewares in one order, every resource in a cleanup context."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from llm_proxy.audit.writer import AuditWriter
from llm_proxy.crypto import DecryptionError, KeyRing
from llm_proxy.gateway.admission import Admission, IpBlock, add_rate_limit_headers, ip_block_middleware
from llm_proxy.gateway.client_auth import ClientAuth
from llm_proxy.gateway.context import add_request_id_header
from llm_proxy.gateway.cors import cors_headers
from llm_proxy.gateway.edge import edge_middleware
from llm_proxy.gateway.forwarder import Forwarder
from llm_proxy.gateway.proxy import ProxyRoute
from llm_proxy.gateway.security_headers import response_hook, security_headers
from llm_proxy.limiting.base import FailureLimiter, Limiter
from llm_proxy.limiting.memory import ConcurrencyLimiter, FailureCounter, MemoryLimiter
from llm_proxy.manage.api import Management
from llm_proxy.manage.auth import ManagementAuth, ManagementTokens, management_auth_middleware
from llm_proxy.models import iso
from llm_proxy.ops.endpoints import health_routes, metrics_route
from llm_proxy.ops.metrics import Metrics
from llm_proxy.settings import ConfigError, Settings, database_url_passwords, redact_database_url
from llm_proxy.storage.base import Store
from llm_proxy.storage.factory import open_store
from llm_proxy.tokens.anomaly import AnomalyDetector
from llm_proxy.tokens.cache import TokenCache
from llm_proxy.tokens.expiry import ExpiryJob
from llm_proxy.tokens.feed import ChangeFeed, LocalFeed
from llm_proxy.tokens.service import TokenService

if TYPE_CHECKING:  # the redis extra is imported only when REDIS_URL is set
    from redis.asyncio import Redis

    from llm_proxy.limiting.shared import SharedState
    from llm_proxy.tokens.redis_feed import RedisFeed

# The application's resources, for tests and tools that reach into a running app.
SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
KEYRING: web.AppKey[KeyRing] = web.AppKey("keyring")
STORE: web.AppKey[Store] = web.AppKey("store")
TOKEN_CACHE: web.AppKey[TokenCache] = web.AppKey("token_cache")
TOKEN_SERVICE: web.AppKey[TokenService] = web.AppKey("token_service")
AUDIT: web.AppKey[AuditWriter] = web.AppKey("audit")
ANOMALIES: web.AppKey[AnomalyDetector] = web.AppKey("anomalies")
EXPIRY_JOB: web.AppKey[ExpiryJob] = web.AppKey("expiry_job")

log = logging.getLogger(__name__)

# Given to the server runner by `serve`: a connection that has not delivered a complete request
# within this many seconds of opening (or of its previous response) is closed, so a client that
# sends its headers byte by byte cannot pin a connection. Slow bodies are bounded by REQUEST_TIMEOUT.
CONNECTION_IDLE_TIMEOUT = 75.0


def create_app(settings: Settings, *, clock: Callable[[], float] = time.time,
               monotonic: Callable[[], float] = time.monotonic) -> web.Application:
    """Build the application; nothing is opened until it starts (clocks are injectable for tests)."""
    keyring = KeyRing(settings.encryption_key, settings.encryption_keys_previous)
    store = open_store(settings)
    redis = _redis_client(settings) if settings.redis_url else None
    # Several processes hear each other's token changes through Redis; callbacks are bound once the cache exists.
    hooks: dict[str, Callable[..., None]] = {}
    feed: ChangeFeed = LocalFeed() if redis is None else _redis_feed(redis, settings, hooks)
    cache = TokenCache(store, keyring, feed, clock)
    service = TokenService(store, keyring, feed, clock)
    audit = AuditWriter(store.audit, enabled=settings.audit_enabled, file_path=settings.audit_log_file,
                        create_dir=settings.audit_create_dir, store_in_db=settings.audit_store_in_db,
                        mask_client_ip=settings.audit_mask_client_ip, instance=settings.instance)
    concurrency = ConcurrencyLimiter(settings.max_concurrent_requests)
    metrics = Metrics(audit, concurrency, instance=settings.instance)
    management = Management(settings, service, store, cache, audit)
    anomalies = AnomalyDetector(max_ips_per_hour=settings.anomaly_max_ips_per_hour,
                                rate_factor=settings.anomaly_rate_factor, auto_suspend=settings.anomaly_auto_suspend,
                                service=service, audit=audit, clock=clock)
    limiter: Limiter = MemoryLimiter(global_rate=settings.global_rate_limit, clock=clock, monotonic=monotonic)
    failures: FailureLimiter = FailureCounter(settings.ip_rate_limit, clock=monotonic)
    shared: SharedParts | None = None
    if redis is not None:
        shared = _share_limits(settings, redis, feed, hooks, limiter, failures, cache, audit, metrics)
        limiter, failures = shared.limiter, shared.failures
    admission = Admission(limiter, cache, audit, metrics, anomalies, default_rate=settings.rate_limit_per_minute,
                          checks_addresses=shared is not None)
    forwarder = Forwarder(settings, audit, metrics, refund=admission.refund, add_usage=admission.add_usage)
    expiry = ExpiryJob(service, audit)

    # Every request passes one middleware (request context, CORS preflight, error bodies, the
    # count; see edge.py for the order) and one response hook (request id, CORS, security and
    # rate-limit headers, on every response, streamed and error ones included).
    cors = settings.cors_allowed_origins
    app = web.Application(middlewares=[edge_middleware(trusted_proxies=settings.trusted_proxies,
                                                       cors_allowed_origins=cors, metrics=metrics)],
                          client_max_size=settings.max_request_size)
    app[SETTINGS], app[KEYRING], app[STORE], app[AUDIT] = settings, keyring, store, audit
    app[TOKEN_CACHE], app[TOKEN_SERVICE] = cache, service
    app[ANOMALIES], app[EXPIRY_JOB] = anomalies, expiry
    app.on_response_prepare.append(response_hook(
        add_request_id_header,
        *([cors_headers(cors)] if cors else []),
        security_headers(hsts_max_age=settings.hsts_max_age if settings.tls_cert_file else None),
        add_rate_limit_headers))  # only where admission recorded a decision (/v1)
    # Each credential check has its own place, so neither kind of token works on the other's
    # routes: client tokens in the /v1 handler, the management token in the /manage sub-application
    # and on /metrics. All first refuse an IP that failed authentication too often.
    ip_block = IpBlock(failures, audit, metrics)
    management_auth = ManagementAuth(ManagementTokens(settings.management_tokens), settings.management_allowed_ips,
                                     audit, failures)
    app.add_routes([*health_routes(store), metrics_route(metrics, ip_block, management_auth)])
    proxy = ProxyRoute(
        ip_block=ip_block, auth=ClientAuth(cache, audit, failures, anomalies), admission=admission,
        concurrency=concurrency, forwarder=forwarder, metrics=metrics)
    app.router.add_route("*", "/v1/{tail:.*}", proxy.handle)
    manage = web.Application(middlewares=[
        ip_block_middleware(ip_block, "management"),
        management_auth_middleware(management_auth)])
    manage.add_routes(management.routes())
    app.add_subapp("/manage", manage)
    if settings.admin_console:
        from llm_proxy.console.app import console_app  # Jinja2 and the pages load only when served

        app.add_subapp("/admin", console_app(settings, service, store, cache, audit, auth=management_auth,
                                             tokens=ManagementTokens(settings.management_tokens),
                                             ip_block=ip_block, failures=failures, clock=clock))

    app.cleanup_ctx.append(_lifetime(store, keyring, audit, cache, expiry, anomalies, forwarder, shared,
                                     settings.max_concurrent_requests))
    return app


def _lifetime(store: Store, keyring: KeyRing, audit: AuditWriter, cache: TokenCache, expiry: ExpiryJob,
              anomalies: AnomalyDetector, forwarder: Forwarder, shared: SharedParts | None,
              max_connections: int) -> Callable[[web.Application], AsyncIterator[None]]:
    """Start the gateway's resources in order and tear them down in reverse: the upstream session
    closes first, then counters are flushed and the audit queue drained, and the database closes last.

    One context, not one per resource: if a later start fails (an audit file that cannot be opened),
    what already started is closed before the error leaves. aiohttp's run_app does not clean up an
    application whose startup failed, and the database's worker threads would keep the process alive.
    """
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as started:
            await store.open()
            started.push_async_callback(store.close)
            # One serving process per database, or any number sharing one Redis: never one that trusts its
            # own memory beside others (they would disagree).
            await store.claim(f"pid {os.getpid()} on {socket.gethostname()} since {iso(time.time())}",
                              shared=shared is not None)
            if shared is not None:
                started.push_async_callback(shared.close)
                await shared.start()
            await _check_stored_keys(store, keyring)
            await audit.start()
            started.push_async_callback(audit.close)
            cache.start()
            started.push_async_callback(cache.close)
            expiry.start()
            started.push_async_callback(anomalies.close)
            started.push_async_callback(expiry.close)
            forwarder.session = session = forwarder.new_session(max_connections)
            started.push_async_callback(session.close)
            yield
    return ctx


async def _check_stored_keys(store: Store, keyring: KeyRing) -> None:
    """Refuse to start when ENCRYPTION_KEY opens none of the stored upstream keys (the wrong key, most
    likely), and log the projects whose keys it cannot open; otherwise every request of theirs would
    fail later with a 500 and nothing pointing at the cause."""
    projects = await store.projects.all()
    unreadable = []
    for project in projects:
        try:
            keyring.decrypt(project.api_key_encrypted)
        except (DecryptionError, ValueError):  # ValueError: a stored value too damaged for AES-GCM to try
            unreadable.append(project.id)
    if projects and len(unreadable) == len(projects):
        raise ConfigError("ENCRYPTION_KEY", f"opens none of the {len(projects)} stored upstream key(s): is it the "
                                            "key they were written with? (to change keys, set the old one as "
                                            "ENCRYPTION_KEY_PREVIOUS and run `llm-proxy rotate-key`)")
    if unreadable:
        log.error("ENCRYPTION_KEY: the upstream keys of %d project(s) open with no configured key; their "
                  "requests will fail: %s", len(unreadable), ", ".join(unreadable))


# ---- several processes: the limits and the change feed shared through Redis (REDIS_URL) ----

# Each call waits this long for Redis at most; a stopped Redis refuses at once, a stalled one is
# given up on after this and counted as an outage.
REDIS_TIMEOUT = 1.0


@dataclass
class SharedParts:
    """What a process sharing Redis adds: the shared limiters, the state of the connection, the client."""
    limiter: Limiter
    failures: FailureLimiter
    state: SharedState
    client: Redis
    feed: RedisFeed
    closers: tuple[Callable[[], Any], ...]

    async def start(self) -> None:
        await self.feed.start()

    async def close(self) -> None:
        await self.feed.close()
        for close in self.closers:
            await close()
        await self.state.close()
        await self.client.aclose()


def _redis_client(settings: Settings) -> Redis:
    try:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
    except ImportError:
        raise ConfigError("REDIS_URL", "needs the redis extra: pip install 'llm-proxy[redis]'") from None
    # One retry on a fresh connection: a pooled connection Redis closed (a restart) fails its first command.
    return Redis.from_url(settings.redis_url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT,
                          retry=Retry(NoBackoff(), 1), health_check_interval=10)


def _redis_feed(client: Redis, settings: Settings, hooks: dict[str, Callable[..., None]]) -> RedisFeed:
    from llm_proxy.tokens.redis_feed import RedisFeed

    return RedisFeed(client, instance=settings.instance,
                     on_reconnect=lambda: hooks["reconnect"](), on_state=lambda up: hooks["state"](up))


def _share_limits(settings: Settings, client: Redis, feed: ChangeFeed, hooks: dict[str, Callable[..., None]],
                  local: Limiter, local_failures: FailureLimiter, cache: TokenCache, audit: AuditWriter,
                  metrics: Metrics) -> SharedParts:
    """Build the limiters shared through Redis around this process's own ones, and what an outage does."""
    from llm_proxy.limiting.redis import RedisFailureLimiter, RedisLimiter
    from llm_proxy.limiting.shared import SharedFailureLimiter, SharedLimiter, SharedState
    from llm_proxy.tokens.redis_feed import RedisFeed

    fail_open = settings.redis_failure_mode == "open"
    passwords = database_url_passwords(settings.redis_url)
    where = redact_database_url(settings.redis_url)
    metrics.shared_state_used = True

    def on_error() -> None:
        metrics.shared_state_errors += 1

    def on_change(available: bool, reason: str) -> None:
        metrics.shared_state_available = available
        for password in passwords:
            reason = reason.replace(password, "***")
        mode = settings.redis_failure_mode
        if available:
            # Changes published meanwhile may never have arrived: every token is read again.
            cache.forget_all()
            cache.reread_after = None
            log.warning("shared state: Redis at %s answers again; cached tokens dropped", where)
            audit.emit("system.recovered", actor="system", result="success", details={"component": "redis",
                                                                                      "mode": mode})
            return
        if fail_open:
            cache.reread_after = 1.0  # tokens re-read from the database, at most 1 s old
        log.error("shared state: Redis at %s cannot be reached (%s); until it answers, %s", where, reason,
                  "proxying serves on this process's own limits" if fail_open
                  else "proxying answers 503 shared_state_unavailable")
        audit.emit("system.degraded", actor="system", result="error",
                   details={"component": "redis", "mode": mode, "reason": reason})

    state = SharedState(client.ping, on_change=on_change, on_error=on_error)

    def feed_state(up: bool) -> None:
        # The subscription broke (or is back): an outage as any failed call is, and the probe closes it.
        if not up:
            state.failed(ConnectionError("the change feed's subscription to Redis broke"))

    hooks["reconnect"], hooks["state"] = cache.forget_all, feed_state
    limiter = SharedLimiter(RedisLimiter(client, global_rate=settings.global_rate_limit,
                                         failure_limit=settings.ip_rate_limit),
                            local, local_failures, state, fail_open=fail_open)
    failures = SharedFailureLimiter(RedisFailureLimiter(client, settings.ip_rate_limit), local_failures, state)
    assert isinstance(feed, RedisFeed)
    return SharedParts(limiter, failures, state, client, feed, closers=(limiter.close,))
