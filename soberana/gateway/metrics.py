"""The gateway's Prometheus metrics: per backend and model, per tenant, and live fleet gauges."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from soberana.gateway.backend import BackendState

PREFIX = "soberana_gateway_"
M = TypeVar("M", Counter, Gauge, Histogram)
# Seconds. The gateway's own overhead sits well under a millisecond; upstream calls take seconds.
_ADDED_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1, 1.0)
_UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def declare(registry: CollectorRegistry, kind: type[M], name: str, documentation: str,
            labels: tuple[str, ...] = (), **kwargs: Any) -> M:  # fmt: skip
    """One gateway metric, `soberana_gateway_<name>`, in the gateway's registry (the privacy
    layer's metrics are declared the same way)."""
    return kind(f"{PREFIX}{name}", documentation, list(labels), registry=registry, **kwargs)


class GatewayMetrics:
    """All counters and histograms, in a registry of their own."""

    def __init__(self, backends: Callable[[], list[BackendState]]) -> None:
        self.registry = r = CollectorRegistry()
        by_backend = ("model", "backend")
        self.requests = declare(r, Counter, "requests", "Upstream attempts sent to a backend.",
                                by_backend)  # fmt: skip
        self.errors = declare(
            r, Counter, "errors",
            "Failed upstream attempts (connect, timeout, disconnected, http_5xx, http_429, "
            "backend_down, stream_interrupted, stream_truncated).", (*by_backend, "reason"))
        self.retries = declare(
            r, Counter, "retries",
            "Attempts retried on another backend, by the backend that failed.", by_backend)
        self.failovers = declare(
            r, Counter, "failovers",
            "Requests served by a backend after another failed or outside the requested region, "
            "by the backend that served.", by_backend)
        self.overflows = declare(
            r, Counter, "overflows",
            "Requests spilled to the overflow pool because every primary backend was saturated.",
            by_backend)
        self.ejections = declare(
            r, Counter, "ejections", "Backends ejected after consecutive failed requests.",
            by_backend)
        self.responses = declare(
            r, Counter, "responses", "Responses the gateway returned to clients, by HTTP status.",
            ("model", "code"))
        self.upstream_latency = declare(
            r, Histogram, "upstream_latency_seconds",
            "Time from sending a request upstream to its full body (streams: first chunk).",
            by_backend, buckets=_UPSTREAM_BUCKETS)
        self.upstream_first_byte = declare(
            r, Histogram, "upstream_first_byte_seconds",
            "Time from sending a request upstream to its first byte (streams: first chunk).",
            by_backend, buckets=_UPSTREAM_BUCKETS)
        self.upstream_total = declare(
            r, Histogram, "upstream_total_seconds",
            "Time from sending a request upstream to the end of its body (streams: last chunk).",
            by_backend, buckets=_UPSTREAM_BUCKETS)
        self.added_latency = declare(
            r, Histogram, "added_latency_seconds",
            "Time the gateway itself adds to a request (total minus upstream and queue waits).",
            ("model",), buckets=_ADDED_BUCKETS)
        self.queue_wait = declare(
            r, Histogram, "queue_wait_seconds", "Time requests waited for a free backend slot.",
            ("model",), buckets=_UPSTREAM_BUCKETS)
        self.tenant_requests = declare(
            r, Counter, "tenant_requests",
            'Requests per tenant (tenant="all" unless metrics.tenant_labels is on).',
            ("tenant", "model"))
        self.tenant_tokens = declare(
            r, Counter, "tenant_tokens",
            "Tokens per tenant (type: prompt or completion; estimated when a backend reports no "
            "usage).", ("tenant", "model", "type"))
        self.rejections = declare(
            r, Counter, "rejections",
            "Requests refused before routing (rate_limit_exceeded, concurrency_limit_exceeded, "
            "queue_full, queue_timeout, ...), by tenant.", ("tenant", "reason"))
        r.register(_FleetCollector(backends))


class _FleetCollector(Collector):
    """Backend gauges read from live state at scrape time (nothing to update on the hot path)."""

    def __init__(self, backends: Callable[[], list[BackendState]]) -> None:
        self.backends = backends

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["model", "backend"]
        healthy = GaugeMetricFamily(
            "soberana_gateway_backend_healthy",
            "1 if the backend may receive traffic (healthy, not ejected).",
            labels=labels,
        )
        ejected = GaugeMetricFamily(
            "soberana_gateway_backend_ejected",
            "1 while the backend sits out an ejection cooldown.",
            labels=labels,
        )
        outstanding = GaugeMetricFamily(
            "soberana_gateway_backend_outstanding_requests",
            "Requests in flight to the backend.",
            labels=labels,
        )
        waiting = GaugeMetricFamily(
            "soberana_gateway_backend_num_requests_waiting",
            "Backend queue length, scraped from its /metrics.",
            labels=labels,
        )
        kv = GaugeMetricFamily(
            "soberana_gateway_backend_kv_cache_usage_perc",
            "Backend KV-cache usage (0..1), scraped.",
            labels=labels,
        )
        info = GaugeMetricFamily(
            "soberana_gateway_backend_info",
            "Static backend facts.",
            labels=[*labels, "kind", "hardware", "region", "pool", "privacy"],
        )
        for b in self.backends():
            key = [b.model, b.name]
            healthy.add_metric(key, 1.0 if b.healthy and not b.ejected() else 0.0)
            ejected.add_metric(key, 1.0 if b.ejected() else 0.0)
            outstanding.add_metric(key, b.outstanding)
            waiting.add_metric(key, b.waiting)
            kv.add_metric(key, b.kv_usage)
            c = b.config
            info.add_metric([*key, c.kind, c.hardware, c.region, c.pool, c.privacy], 1.0)
        yield from (healthy, ejected, outstanding, waiting, kv, info)
