"""The server's spans of one finished request, with OpenTelemetry's GenAI conventions.

Written when the request is over, from timestamps the engine client recorded: the HTTP
request (SERVER span, child of the caller's `traceparent`) and, per engine request, its
`queue`, `prefill` and `decode` phases. Building them afterwards keeps tracing off the token
path entirely (vLLM's API server does the same).
"""

from __future__ import annotations

from opentelemetry.trace import SpanKind, Status, StatusCode

from soberana.server.request_log import RequestRecord
from soberana.tracing import Tracing, extract, seconds_to_ns

_OPERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion"}


def emit_request_spans(tracing: Tracing, scope: dict, record: RequestRecord, status: int,
                       end: float) -> None:
    """One SERVER span for the HTTP request, with queue/prefill/decode children."""
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
    operation = _OPERATIONS.get(scope["path"])
    name = f"{operation} {record.model}" if operation else f"{scope['method']} {scope['path']}"
    span = tracing.tracer.start_span(
        name, context=extract(headers), kind=SpanKind.SERVER,
        start_time=seconds_to_ns(record.arrival),
    )
    attributes = {
        "http.request.method": scope["method"],
        "url.path": scope["path"],
        "http.response.status_code": status,
        "gen_ai.request.id": record.request_id,
    }
    if operation:
        attributes.update({
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": "soberana",
            "gen_ai.request.model": record.model or "",
            "gen_ai.response.model": record.model or "",
            "gen_ai.usage.input_tokens": record.prompt_tokens,
            "gen_ai.usage.output_tokens": record.completion_tokens,
            "gen_ai.usage.cache_read.input_tokens": record.cached_tokens,
            "gen_ai.response.finish_reasons": sorted(set(record.finish_reasons)),
            "gen_ai.latency.e2e": end - record.arrival,
        })
        if record.first_token is not None:
            attributes["gen_ai.latency.time_to_first_token"] = record.first_token - record.arrival
    span.set_attributes(attributes)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
    parent = _as_parent(span)
    for times in record.engine_requests:
        _phase(tracing, parent, "queue", times.arrival, times.scheduled)
        _phase(tracing, parent, "prefill", times.scheduled, times.first_token)
        _phase(tracing, parent, "decode", times.first_token, times.last_token)
    span.end(end_time=seconds_to_ns(end))


def _phase(tracing: Tracing, parent, name: str, start: float | None, end: float | None) -> None:
    if start is None or end is None:
        return  # the request never reached this phase (aborted while queued, ...)
    tracing.tracer.start_span(name, context=parent, start_time=seconds_to_ns(start)).end(
        end_time=seconds_to_ns(max(start, end))
    )


def _as_parent(span):
    from opentelemetry import trace

    return trace.set_span_in_context(span)
