"""Operability: /health follows backend availability, upstream latency is split into first
byte and total, and the request id reaches the backend."""

from __future__ import annotations

import httpx

from tests.gateway.helpers import backend, config, tenant, wait_until

KEY = "sk-acme"


def test_health_is_503_while_no_backend_is_available(upstreams, start_gateway):
    up = upstreams("up")
    down = upstreams("down", health_status=503)
    gw = start_gateway(config({"m": [backend("down", down)], "n": [backend("up", up)]},
                              [tenant("acme", KEY)]))
    wait_until(lambda: gw.metric("soberana_gateway_backend_healthy", backend="down") == 0,
               what="marked down")
    health = httpx.get(gw.url + "/health")
    assert health.status_code == 200  # model n can still be served
    assert health.json() == {"status": "ok", "backends": 2, "backends_available": 1}

    lonely = start_gateway(config({"m": [backend("down", down)]}, [tenant("acme", KEY)]))
    wait_until(lambda: lonely.metric("soberana_gateway_backend_healthy", backend="down") == 0,
               what="marked down")
    health = httpx.get(lonely.url + "/health")
    assert health.status_code == 503
    assert health.json() == {"status": "no_backend_available", "backends": 1, "backends_available": 0}
    assert "X-Request-Id" in health.headers


def test_upstream_latency_is_split_into_first_byte_and_total(upstreams, start_gateway):
    up = upstreams("up", stream_chunks=3, chunk_delay_s=0.3)
    gw = start_gateway(config({"m": [backend("up", up)]}, [tenant("acme", KEY)]))
    r = gw.post("/v1/chat/completions", KEY, {"model": "m", "stream": True,
                                               "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    count = lambda name: gw.metric(f"soberana_gateway_upstream_{name}_seconds_count", model="m", backend="up")  # noqa: E731
    total = lambda name: gw.metric(f"soberana_gateway_upstream_{name}_seconds_sum", model="m", backend="up")  # noqa: E731
    assert count("first_byte") == 1 and count("total") == 1
    # Three chunks 0.3 s apart: the stream's end comes at least 0.6 s after its first byte.
    assert total("total") - total("first_byte") >= 0.55


def test_client_request_id_is_forwarded_to_the_backend_and_echoed(upstreams, start_gateway):
    up = upstreams("up")
    gw = start_gateway(config({"m": [backend("up", up)]}, [tenant("acme", KEY)]))
    r = gw.chat(KEY, headers={"X-Request-Id": "trace-42"})
    assert r.status_code == 200 and r.headers["X-Request-Id"] == "trace-42"
    assert up.received[-1].headers["X-Request-Id"] == "trace-42"


def test_client_traceparent_reaches_the_backend_with_tracing_off(upstreams, start_gateway):
    up = upstreams("up")
    gw = start_gateway(config({"m": [backend("up", up)]}, [tenant("acme", KEY)]))
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert gw.chat(KEY, headers={"traceparent": parent}).status_code == 200
    assert up.received[-1].headers["traceparent"] == parent
    assert gw.chat(KEY).status_code == 200
    assert "traceparent" not in up.received[-1].headers  # no trace, none invented
