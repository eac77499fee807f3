"""Pass-through: streams relayed chunk by chunk, bodies verbatim, request ids, errors, metrics."""

from __future__ import annotations

import json
import socket
import time

import httpx

from tests.gateway.helpers import backend, config, tenant, wait_until

KEY = "sk-acme"


def single(upstreams, start_gateway, **behaviour):
    up = upstreams("up", **behaviour)
    return start_gateway(config({"m": [backend("up", up)]}, [tenant("acme", KEY)])), up


def test_stream_events_reach_the_client_as_the_backend_sends_them(upstreams, start_gateway):
    gw, _ = single(upstreams, start_gateway, stream_chunks=4, chunk_delay_s=0.5)
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    arrivals = []
    with httpx.stream(
        "POST",
        gw.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
    ) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic())
    assert len(arrivals) == 4
    # The backend spaces its events 0.5 s apart; a buffering relay would deliver them together.
    assert arrivals[-1] - arrivals[0] > 1.0


def test_non_streaming_bodies_are_relayed_verbatim(upstreams, start_gateway):
    gw, up = single(upstreams, start_gateway)
    r = gw.post(
        "/v1/completions", KEY, {"model": "m", "prompt": "Once upon a time", "max_tokens": 5}
    )
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "hello from up"
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert (
        up.received[-1].path == "/v1/completions"
        and up.received[-1].body["prompt"] == "Once upon a time"
    )


def test_every_response_carries_a_request_id(upstreams, start_gateway):
    gw, _ = single(upstreams, start_gateway)
    responses = [
        gw.chat(KEY),
        gw.chat("sk-wrong"),
        httpx.get(gw.url + "/v1/nowhere"),
        httpx.get(gw.url + "/v1/chat/completions"),
        httpx.get(gw.url + "/health"),
        httpx.get(gw.url + "/metrics"),
    ]
    assert [r.status_code for r in responses] == [200, 401, 404, 405, 200, 200]
    ids = [r.headers["X-Request-Id"] for r in responses]
    assert all(len(i) == 32 for i in ids) and len(set(ids)) == len(ids)
    assert responses[2].json()["error"]["code"] == "not_found"
    assert responses[3].json()["error"]["code"] == "method_not_allowed"

    assert gw.chat(KEY, headers={"X-Request-Id": "trace-42"}).headers["X-Request-Id"] == "trace-42"
    injected = gw.chat(KEY, headers={"X-Request-Id": "bad id\twith tab"}).headers["X-Request-Id"]
    assert injected != "bad id\twith tab" and len(injected) == 32


def test_an_oversized_body_gets_an_openai_shaped_413(upstreams, start_gateway):
    gw, up = single(upstreams, start_gateway)
    big = b'{"model": "m", "prompt": "' + b"x" * (65 * 1024 * 1024) + b'"}'
    r = httpx.post(
        gw.url + "/v1/completions",
        content=big,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert up.received == []


def test_a_client_leaving_mid_stream_frees_the_backend_slot(upstreams, start_gateway):
    gw, up = single(upstreams, start_gateway, stream_chunks=50, chunk_delay_s=0.1)
    body = json.dumps(
        {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        received = b""
        while b"up-0" not in received:
            data = sock.recv(65536)
            assert data, "the gateway closed the stream before its first event"
            received += data
    # The 50-chunk stream would take 5 s; the slot and the upstream request end well before.
    wait_until(lambda: up.in_flight == 0, timeout=3, what="the upstream to see the disconnect")
    assert gw.metric("soberana_gateway_backend_outstanding_requests", backend="up") == 0


def test_metrics_cover_requests_latency_backends_and_tenants(upstreams, start_gateway):
    gw, _ = single(upstreams, start_gateway)
    for i in range(3):
        assert gw.chat(KEY, content=f"q{i}").status_code == 200
    assert gw.chat("sk-wrong").status_code == 401
    m = gw.metric
    assert m("soberana_gateway_requests_total", model="m", backend="up") == 3
    assert m("soberana_gateway_responses_total", model="m", code="200") == 3
    assert m("soberana_gateway_responses_total", code="401") == 1
    assert m("soberana_gateway_upstream_latency_seconds_count", model="m", backend="up") == 3
    assert m("soberana_gateway_added_latency_seconds_count", model="m") == 3
    assert m("soberana_gateway_tenant_requests_total", tenant="acme", model="m") == 3
    assert m("soberana_gateway_tenant_tokens_total", tenant="acme", type="prompt") == 21
    assert m("soberana_gateway_backend_healthy", backend="up") == 1
    assert m("soberana_gateway_backend_kv_cache_usage_perc", backend="up") == 0.25
    assert m("soberana_gateway_backend_info", backend="up", kind="vllm", pool="primary") == 1
    health = httpx.get(gw.url + "/health").json()
    assert health == {"status": "ok", "backends": 1, "backends_available": 1}
