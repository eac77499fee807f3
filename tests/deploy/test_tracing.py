"""OpenTelemetry: one trace from the client through the gateway to the server's request and
its engine phases, exported over real OTLP/HTTP, with the GenAI attributes."""

from __future__ import annotations

import time

from opentelemetry.trace import SpanKind

from tests.deploy.stack import MODEL

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def test_one_trace_spans_gateway_server_and_engine_phases(stack):
    r = stack.chat("trace me", traceparent=f"00-{TRACE_ID}-{CLIENT_SPAN}-01", max_tokens=5)
    assert r.status_code == 200
    usage = r.json()["usage"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        spans = stack.traces.trace(TRACE_ID)
        # Each process exports its spans on its own schedule: wait for every span read below.
        if {s.name for s in spans} >= {"queue", "prefill", "decode", f"chat {MODEL}",
                                       "gateway POST /v1/chat/completions"}:
            break
        time.sleep(0.3)
    by_name = {s.name: s for s in spans}
    gateway = by_name["gateway POST /v1/chat/completions"]
    server = by_name[f"chat {MODEL}"]
    assert gateway.service == "soberana-gateway" and server.service == "soberana-server"
    assert gateway.parent_span_id == CLIENT_SPAN  # the client's traceparent was honoured
    assert server.parent_span_id == gateway.span_id  # the gateway propagated its own span
    assert gateway.kind == server.kind == SpanKind.SERVER.value + 1  # OTLP enums start at 1
    for phase in ("queue", "prefill", "decode"):
        assert by_name[phase].parent_span_id == server.span_id
        assert server.start_ns <= by_name[phase].start_ns <= by_name[phase].end_ns <= server.end_ns
    assert by_name["queue"].end_ns <= by_name["prefill"].start_ns + 1
    a = server.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == MODEL
    assert a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert a["gen_ai.response.finish_reasons"] == [r.json()["choices"][0]["finish_reason"]]
    assert 0 < a["gen_ai.latency.time_to_first_token"] <= a["gen_ai.latency.e2e"]
    assert gateway.attributes["http.response.status_code"] == 200
    assert server.attributes["gen_ai.request.id"] == r.headers["X-Request-Id"]
