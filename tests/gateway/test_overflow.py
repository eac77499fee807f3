"""Overflow: a saturated primary pool spills to the overflow pool, but only for tenants whose
privacy classes allow it; the others queue (bounded) and then get 429 with Retry-After."""

from __future__ import annotations

import threading
import time

import httpx

from tests.gateway.helpers import backend, concurrently, config, tenant, wait_until

ONPREM, FLEXIBLE = "sk-onprem", "sk-flexible"


def start_fleet(
    upstreams, start_gateway, primary_fields: dict, routing: dict, primary_delay: float = 1.0
):
    primary = upstreams("primary", delay_s=primary_delay)
    cloud = upstreams("cloud")  # stands in for a cloud API; records everything it receives
    gw = start_gateway(
        config(
            {
                "m": [
                    backend("primary", primary, **primary_fields),
                    backend("cloud", cloud, kind="openai", pool="overflow", privacy="external"),
                ]
            },
            [
                tenant("onprem-only", ONPREM, privacy=["onprem"]),
                tenant("flexible", FLEXIBLE, privacy=["onprem", "external"]),
            ],
            routing=routing,
        )
    )
    return gw, primary, cloud


def concurrent_chats(gw, key: str, n: int) -> list[httpx.Response]:
    return concurrently(lambda i: gw.chat(key, content=f"q{i}"), n)


def test_saturated_primary_spills_to_the_overflow_pool(upstreams, start_gateway):
    gw, primary, cloud = start_fleet(
        upstreams, start_gateway, {"max_concurrency": 1}, {"queue_timeout_s": 0.3}
    )
    responses = concurrent_chats(gw, FLEXIBLE, 3)
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert sorted(r.headers["X-Gateway-Backend"] for r in responses) == [
        "cloud",
        "cloud",
        "primary",
    ]
    assert gw.metric("soberana_gateway_overflows_total", backend="cloud") == 2
    # Unsaturated, the primary is used again.
    assert gw.chat(FLEXIBLE, content="later").headers["X-Gateway-Backend"] == "primary"


def test_onprem_tenant_never_reaches_the_external_pool_and_gets_429(upstreams, start_gateway):
    gw, primary, cloud = start_fleet(
        upstreams, start_gateway, {"max_concurrency": 1}, {"queue_timeout_s": 0.3}
    )
    responses = concurrent_chats(gw, ONPREM, 3)
    assert sorted(r.status_code for r in responses) == [200, 429, 429]
    for r in responses:
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "queue_timeout"
            assert int(r.headers["Retry-After"]) >= 1
    assert cloud.received == []  # the recording stand-in for the cloud saw nothing
    assert len(primary.received) == 1
    assert (
        gw.metric("soberana_gateway_rejections_total", tenant="onprem-only", reason="queue_timeout")
        == 2
    )


def test_queued_requests_are_served_when_the_primary_frees_a_slot(upstreams, start_gateway):
    gw, primary, cloud = start_fleet(
        upstreams, start_gateway, {"max_concurrency": 1}, {"queue_timeout_s": 5}, primary_delay=0.3
    )
    responses = concurrent_chats(gw, ONPREM, 3)
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert primary.max_in_flight == 1 and len(primary.received) == 3 and cloud.received == []
    assert gw.metric("soberana_gateway_queue_wait_seconds_count") >= 2


def test_a_full_queue_refuses_at_once(upstreams, start_gateway):
    gw, primary, cloud = start_fleet(
        upstreams, start_gateway, {"max_concurrency": 1}, {"queue_timeout_s": 5, "max_queued": 1}
    )
    started = time.monotonic()
    responses = concurrent_chats(gw, ONPREM, 3)
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 429]
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["code"] == "queue_full"
    assert time.monotonic() - started < 5  # nobody waited out the 5 s queue timeout
    assert cloud.received == []


def test_a_long_backend_queue_counts_as_saturation(upstreams, start_gateway):
    gw, primary, cloud = start_fleet(
        upstreams,
        start_gateway,
        {"kind": "soberana"},
        {"queue_threshold": 4, "queue_timeout_s": 0.3},
        0.0,
    )
    primary.behaviour.waiting = 12  # scraped from its /metrics as vllm:num_requests_waiting
    wait_until(
        lambda: gw.metric("soberana_gateway_backend_num_requests_waiting", backend="primary") == 12
    )
    assert gw.chat(FLEXIBLE).headers["X-Gateway-Backend"] == "cloud"
    r = gw.chat(ONPREM)
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_timeout"
    assert len(cloud.received) == 1 and primary.received == []

    primary.behaviour.waiting = 0
    wait_until(
        lambda: gw.metric("soberana_gateway_backend_num_requests_waiting", backend="primary") == 0
    )
    assert gw.chat(ONPREM).headers["X-Gateway-Backend"] == "primary"
    assert gw.chat(FLEXIBLE).headers["X-Gateway-Backend"] == "primary"


def test_one_tenants_burst_cannot_fill_the_queue_for_the_others(upstreams, start_gateway):
    primary = upstreams("primary", delay_s=1.0)
    gw = start_gateway(
        config(
            {"m": [backend("primary", primary, max_concurrency=1)]},
            [tenant("burst", ONPREM), tenant("quiet", FLEXIBLE)],
            routing={"queue_timeout_s": 30, "max_queued": 8, "max_queued_per_tenant": 4},
        )
    )
    burst: list[httpx.Response] = []
    burster = threading.Thread(
        target=lambda: burst.extend(concurrent_chats_named(gw, ONPREM, "burst", 12))
    )
    burster.start()
    # While its first request is served, the burst queues up to its share (4) and the rest
    # is refused at once; before, it filled all 8 places and the quiet tenant got queue_full.
    wait_until(lambda: len(primary.received) >= 1, what="the burst to start")
    time.sleep(0.3)
    quiet = concurrent_chats_named(gw, FLEXIBLE, "quiet", 2)
    burster.join(60)
    assert [r.status_code for r in quiet] == [200, 200]  # queued, not queue_full
    refused = [r for r in burst if r.status_code == 429]
    assert refused and all(r.json()["error"]["code"] == "queue_full" for r in refused)
    assert "you already have 4 requests queued" in refused[0].json()["error"]["message"]
    # Fair queuing: the quiet tenant's requests do not wait behind the whole burst.
    order = [r.body["messages"][0]["content"].split("-")[0] for r in primary.received]
    assert order.index("quiet") < len(order) - 2 and order[-1] == "burst", order
    assert gw.metric("soberana_gateway_rejections_total", tenant="quiet") == 0


def concurrent_chats_named(gw, key: str, name: str, n: int) -> list[httpx.Response]:
    return concurrently(lambda i: gw.chat(key, content=f"{name}-{i}"), n)
