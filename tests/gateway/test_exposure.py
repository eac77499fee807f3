"""What the gateway reveals: /metrics behind its own key, tenant names only when enabled, no
backend addresses or upstream error text in client responses, ejections in the log."""

from __future__ import annotations

import httpx

from soberana.gateway.tenants import hash_key
from tests.gateway.helpers import backend, config, tenant

KEY, METRICS_KEY = "sk-acme", "sk-prometheus"


def test_metrics_needs_the_metrics_key_when_one_is_configured(upstreams, start_gateway):
    up = upstreams("up")
    gw = start_gateway(
        config(
            {"m": [backend("up", up, hardware="h200-secret-rack")]},
            [tenant("acme", KEY)],
            metrics={"api_key_sha256": [hash_key(METRICS_KEY)]},
        )
    )
    url = gw.url + "/metrics"
    anonymous = httpx.get(url)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
    assert "h200-secret-rack" not in anonymous.text
    as_tenant = httpx.get(url, headers={"Authorization": f"Bearer {KEY}"})
    assert as_tenant.status_code == 401  # a tenant's key never opens the fleet's metrics
    scraper = httpx.get(url, headers={"Authorization": f"Bearer {METRICS_KEY}"})
    assert scraper.status_code == 200 and 'hardware="h200-secret-rack"' in scraper.text


def test_tenant_names_stay_out_of_metrics_unless_enabled(upstreams, start_gateway):
    up = upstreams("up")
    gw = start_gateway(
        config(
            {"m": [backend("up", up)]},
            [tenant("acme-merger-team", KEY, requests_per_minute=1)],
            metrics={"tenant_labels": False},
        )
    )
    assert gw.chat(KEY).status_code == 200
    assert gw.chat(KEY).status_code == 429
    text = httpx.get(gw.url + "/metrics").text
    assert "acme-merger-team" not in text
    assert gw.metric("soberana_gateway_tenant_requests_total", tenant="all") == 1
    assert gw.metric("soberana_gateway_rejections_total", tenant="all") == 1


def test_errors_and_headers_name_backends_never_their_addresses_or_upstream_text(
    upstreams, start_gateway
):
    failing, dropping = upstreams("a", mode="fail"), upstreams("b", mode="drop")
    # No `name:` given: the default names must not be the endpoints' host:port.
    entries = [backend("a", failing), backend("b", dropping)]
    for entry in entries:
        del entry["name"]
    gw = start_gateway(config({"m": entries}, [tenant("acme", KEY)]))
    r = gw.chat(KEY)
    assert r.status_code == 502
    message = r.json()["error"]["message"]
    assert "backend-0: HTTP 500" in message and "backend-1: connection lost" in message
    for secret in ("127.0.0.1", str(failing.port), str(dropping.port), "boom"):
        assert secret not in r.text
    assert "boom" in gw.log()  # the upstream's own error text is for the operator's log

    failing.behaviour.mode = "ok"
    dropping.behaviour.mode = "ok"
    served = gw.chat(KEY)
    assert served.status_code == 200
    assert served.headers["X-Gateway-Backend"] in ("backend-0", "backend-1")


def test_a_passive_ejection_is_logged_as_a_warning_with_its_reason(upstreams, start_gateway):
    first, spare = upstreams("first", mode="fail"), upstreams("spare")
    gw = start_gateway(
        config(
            {"m": [backend("first", first, region="here"), backend("spare", spare)]},
            [tenant("acme", KEY, region="here")],
        )
    )
    for i in range(2):  # eject_after is 2 in the test health settings
        assert gw.chat(KEY, content=f"q{i}").status_code == 200
    ejections = [line for line in gw.log().splitlines() if "ejected" in line]
    assert len(ejections) == 1
    assert ejections[0].startswith("WARNING ") and "backend m/first" in ejections[0]
    assert "2 consecutive failed requests" in ejections[0] and "http_5xx" in ejections[0]
