"""Prometheus metrics: the hot path adds to plain numbers; prometheus_client renders them at scrape time."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal, get_args

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from llm_proxy import __version__
from llm_proxy.audit.writer import AuditWriter
from llm_proxy.limiting.memory import ConcurrencyLimiter

if TYPE_CHECKING:
    pass

_STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
_ROUTES = ("proxy", "manage", "other")
# Why a request was refused before it was forwarded (llm_proxy_rate_limit_denials_total's `reason`).
DenialReason = Literal["rate_limited", "quota_exceeded", "budget_exceeded", "ip_blocked", "overloaded"]
CutReason = Literal["upstream_broke", "client_stalled"]
_DENIAL_REASONS: tuple[DenialReason, ...] = get_args(DenialReason)
CUT_REASONS: tuple[CutReason, ...] = get_args(CutReason)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    """A histogram kept as plain bucket counts, observed and read on the event loop thread only.

    prometheus_client's own Histogram takes a lock and walks every bucket on each observation;
    under load that was several µs per request for numbers that are only read at scrape time.
    """

    __slots__ = ("_bounds", "_counts", "_sum", "documentation", "name")

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self._bounds = buckets
        self._counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self._sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation in the first bucket whose upper bound is >= value."""
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def family(self) -> HistogramMetricFamily:
        """Render the cumulative buckets, sum and count."""
        buckets, running = [], 0
        for bound, count in zip((*self._bounds, math.inf), self._counts, strict=True):
            running += count
            buckets.append((floatToGoString(bound), running))  # type: ignore[no-untyped-call]
        return HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=self._sum)


class _LiveCollector(Collector):
    """Read gauges and counters owned by other objects at scrape time, costing the hot path nothing."""

    def __init__(self, metrics: Metrics, audit: AuditWriter, concurrency: ConcurrencyLimiter) -> None:
        self._metrics = metrics
        self._audit = audit
        self._concurrency = concurrency

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        metrics = self._metrics
        info = GaugeMetricFamily("llm_proxy_info", "This process: its version and its INSTANCE_ID",
                                 labels=("version", "instance"))
        info.add_metric((__version__, metrics.instance), 1)
        yield info
        requests = CounterMetricFamily("llm_proxy_requests", "HTTP requests answered, by route family and status class",
                                       labels=("route", "status_class"))
        for (route, status_class), count in metrics.requests.items():
            requests.add_metric((route, status_class), count)
        yield requests
        denials = CounterMetricFamily("llm_proxy_rate_limit_denials", "Requests refused by a limit, by reason",
                                      labels=("reason",))
        for reason, count in metrics.denials.items():
            denials.add_metric((reason,), count)
        yield denials
        cut = CounterMetricFamily("llm_proxy_responses_cut",
                                  "Proxied answers cut off after their status was sent (counted by that status in "
                                  "llm_proxy_requests_total), by reason", labels=("reason",))
        for cut_reason, count in metrics.cut.items():
            cut.add_metric((cut_reason,), count)
        yield cut
        yield metrics.upstream_latency.family()
        yield metrics.upstream_ttfb.family()
        yield GaugeMetricFamily("llm_proxy_in_flight_requests", "Proxied requests in flight",
                                value=self._concurrency.in_flight)
        yield GaugeMetricFamily("llm_proxy_audit_queue_depth", "Audit events waiting to be written",
                                value=self._audit.queue_depth)
        yield CounterMetricFamily("llm_proxy_audit_dropped", "Audit events dropped because the queue was full",
                                  value=self._audit.dropped)
        yield CounterMetricFamily("llm_proxy_audit_file_errors", "Audit events that could not be written to the file",
                                  value=self._audit.file_errors)
        yield CounterMetricFamily("llm_proxy_audit_written", "Audit events written", value=self._audit.written)
        if metrics.shared_state_used:
            yield CounterMetricFamily("llm_proxy_shared_state_errors",
                                      "Calls to Redis (REDIS_URL) that failed", value=metrics.shared_state_errors)
            yield GaugeMetricFamily("llm_proxy_shared_state_available",
                                    "1 while Redis (REDIS_URL) answers, 0 during an outage",
                                    value=int(metrics.shared_state_available))
        yield CounterMetricFamily("llm_proxy_audit_db_errors",
                                  "Audit batches the database refused after every retry (their rows are retried)",
                                  value=self._audit.db_errors)


class Metrics:
    """The gateway's instruments."""

    def __init__(self, audit: AuditWriter, concurrency: ConcurrencyLimiter, *, instance: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.instance = instance
        self.requests = {(route, cls): 0 for route in _ROUTES for cls in _STATUS_CLASSES}
        self.denials = dict.fromkeys(_DENIAL_REASONS, 0)
        self.cut = dict.fromkeys(CUT_REASONS, 0)
        self.upstream_latency = Histogram("llm_proxy_upstream_latency_seconds",
                                          "Time from sending upstream to its response headers", _LATENCY_BUCKETS)
        self.upstream_ttfb = Histogram("llm_proxy_upstream_ttfb_seconds",
                                       "Time from sending upstream to the first body byte relayed", _LATENCY_BUCKETS)
        # With REDIS_URL: calls to Redis that failed, and whether it answers now.
        self.shared_state_used = False
        self.shared_state_errors = 0
        self.shared_state_available = True
        self.registry.register(_LiveCollector(self, audit, concurrency))

    def count_response(self, path: str, status: int) -> None:
        """Count one answered request."""
        route = "proxy" if path.startswith("/v1/") else "manage" if path.startswith("/manage/") else "other"
        self.requests[route, _STATUS_CLASSES[min(max(status // 100, 1), 5) - 1]] += 1

    def count_denial(self, reason: DenialReason) -> None:
        """Count one request refused by a limit."""
        if reason in self.denials:
            self.denials[reason] += 1

    def count_cut(self, reason: CutReason) -> None:
        """Count one answer cut off after its status was sent: the upstream broke, or the client stopped reading."""
        self.cut[reason] += 1

    def render(self) -> bytes:
        """Return the Prometheus text exposition."""
        return generate_latest(self.registry)
