"""OpenTelemetry tracing, off unless an OTLP endpoint is configured (vLLM's
`--otlp-traces-endpoint`). W3C `traceparent` is read from requests and written to upstream
calls either way, so a trace started by a client survives a hop that does not record spans.

Only opentelemetry-api is a dependency; the SDK and the OTLP/HTTP exporter are imported when
an endpoint is given (`pip install soberana[tracing]`).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()


def extract(headers: Mapping[str, str]) -> otel_context.Context:
    """The trace context a request carries (`traceparent`/`tracestate`), or an empty one."""
    return _PROPAGATOR.extract({k.lower(): v for k, v in headers.items()})


def inject(headers: MutableMapping[str, str], ctx: otel_context.Context | None = None) -> None:
    """Write `ctx` (default: the current context) as W3C headers; nothing when it holds no trace."""
    _PROPAGATOR.inject(headers, context=ctx)


class Tracing:
    """A tracer exporting over OTLP/HTTP to `endpoint` (…/v1/traces is appended if missing)."""

    def __init__(self, service_name: str, endpoint: str, schedule_delay_ms: int = 1000) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as exc:
            raise ValueError(
                "--otlp-traces-endpoint needs the OpenTelemetry SDK and OTLP exporter: "
                "pip install 'soberana[tracing]'"
            ) from exc
        if not endpoint.startswith(("http://", "https://")):
            raise ValueError(f"--otlp-traces-endpoint must be an http(s) URL; got {endpoint!r}")
        url = endpoint.rstrip("/")
        url = url if url.endswith("/v1/traces") else url + "/v1/traces"
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        # Spans leave in batches off the request path; a slow collector never delays a request.
        self.provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=url), schedule_delay_millis=schedule_delay_ms)
        )
        self.tracer: Any = self.provider.get_tracer("soberana")

    def shutdown(self) -> None:
        """Flush what is queued."""
        self.provider.shutdown()


def from_endpoint(service_name: str, endpoint: str | None) -> Tracing | None:
    """Tracing when an endpoint is configured, else None (no spans, no cost)."""
    return Tracing(service_name, endpoint) if endpoint else None


def seconds_to_ns(t: float) -> int:
    return int(t * 1e9)
