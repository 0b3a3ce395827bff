"""Prometheus metrics: one registry per application, children bound once so the hot path only adds numbers."""

from __future__ import annotations

from collections.abc import Iterator

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .audit import AuditWriter
from .auth import ManagementTokens, bearer
from .errors import InvalidManagementToken
from .keys import CLIENT_IP
from .ratelimit import ConcurrencyLimiter
from .request_context import ip_in
from .settings import IPNetwork

_STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
_ROUTES = ("proxy", "manage", "other")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _LiveCollector(Collector):
    """Read gauges and counters owned by other objects at scrape time, costing the hot path nothing."""

    def __init__(self, audit: AuditWriter, concurrency: ConcurrencyLimiter) -> None:
        self._audit = audit
        self._concurrency = concurrency

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield GaugeMetricFamily("llm_proxy_in_flight_requests", "Proxied requests in flight",
                                value=self._concurrency.in_flight)
        yield GaugeMetricFamily("llm_proxy_audit_queue_depth", "Audit events waiting to be written",
                                value=self._audit.queue_depth)
        yield CounterMetricFamily("llm_proxy_audit_dropped", "Audit events dropped because the queue was full",
                                  value=self._audit.dropped)
        yield CounterMetricFamily("llm_proxy_audit_file_errors", "Audit events that could not be written to the file",
                                  value=self._audit.file_errors)
        yield CounterMetricFamily("llm_proxy_audit_written", "Audit events written", value=self._audit.written)


class Metrics:
    """The gateway's instruments."""

    def __init__(self, audit: AuditWriter, concurrency: ConcurrencyLimiter) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        requests = Counter("llm_proxy_requests", "HTTP requests answered, by route family and status class",
                           ("route", "status_class"), registry=self.registry)
        self._requests = {(route, cls): requests.labels(route, cls) for route in _ROUTES for cls in _STATUS_CLASSES}
        self.upstream_latency = Histogram("llm_proxy_upstream_latency_seconds",
                                          "Time from sending upstream to its response headers",
                                          buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.upstream_ttfb = Histogram("llm_proxy_upstream_ttfb_seconds",
                                       "Time from sending upstream to the first body byte relayed",
                                       buckets=_LATENCY_BUCKETS, registry=self.registry)
        denials = Counter("llm_proxy_rate_limit_denials", "Requests refused by a limit, by reason", ("reason",),
                          registry=self.registry)
        self._denials = {reason: denials.labels(reason) for reason in
                         ("rate_limited", "quota_exceeded", "budget_exceeded", "ip_blocked", "overloaded")}
        self.registry.register(_LiveCollector(audit, concurrency))

    def count_response(self, path: str, status: int) -> None:
        """Count one answered request."""
        route = "proxy" if path.startswith("/v1/") else "manage" if path.startswith("/manage/") else "other"
        self._requests[route, _STATUS_CLASSES[min(max(status // 100, 1), 5) - 1]].inc()

    def count_denial(self, reason: str) -> None:
        """Count one request refused by a limit."""
        child = self._denials.get(reason)
        if child is not None:
            child.inc()

    def render(self) -> bytes:
        """Return the Prometheus text exposition."""
        return generate_latest(self.registry)


def metrics_middleware(metrics: Metrics) -> Middleware:
    """Build the middleware counting every answered request by status class."""

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        metrics.count_response(request.path, response.status)
        return response

    return count


def metrics_route(metrics: Metrics, tokens: ManagementTokens, allowed_ips: tuple[IPNetwork, ...]) -> web.RouteDef:
    """Return GET /metrics: open to a management token, or to MANAGEMENT_ALLOWED_IPS when that is set."""

    async def handler(request: web.Request) -> web.Response:
        if not tokens.accepts(bearer(request)) and not (allowed_ips and ip_in(request[CLIENT_IP], allowed_ips)):
            raise InvalidManagementToken(headers={"WWW-Authenticate": "Bearer"})
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return web.get("/metrics", handler, allow_head=False)
