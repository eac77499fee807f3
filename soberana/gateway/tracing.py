"""The gateway's span per request, and the trace context it hands to backends.

With tracing on, each request gets a SERVER span, child of the client's `traceparent`, made
current so the upstream call carries it onward. With tracing off, the client's own trace
context is made current unchanged: the backend still joins the client's trace.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind, Status, StatusCode

from soberana.tracing import Tracing, extract

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def trace_middleware(tracing: Tracing | None):
    """aiohttp middleware; place it inside the envelope so the request id is known."""

    @web.middleware
    async def traced(request: web.Request, handler: _Handler) -> web.StreamResponse:
        parent = extract(request.headers)
        if tracing is None:
            token = otel_context.attach(parent)
            try:
                return await handler(request)
            finally:
                otel_context.detach(token)
        with tracing.tracer.start_as_current_span(
            f"gateway {request.method} {request.path}", context=parent, kind=SpanKind.SERVER,
            record_exception=False, set_status_on_exception=False,
        ) as span:
            span.set_attribute("http.request.method", request.method)
            span.set_attribute("url.path", request.path)
            span.set_attribute("gen_ai.request.id", request.get("request_id", ""))
            try:
                response = await handler(request)
            except web.HTTPException as e:
                span.set_attribute("http.response.status_code", e.status)
                raise
            except Exception as e:  # a GatewayError becomes its OpenAI error in the envelope
                status = getattr(e, "status", 500)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR, type(e).__name__))
                raise
            span.set_attribute("http.response.status_code", response.status)
            if request.get("model"):
                span.set_attribute("gen_ai.request.model", request["model"])
            if response.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            return response

    return traced
