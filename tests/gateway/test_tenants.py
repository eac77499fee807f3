"""Tenants: authentication, model access, rate and concurrency limits, cache salts, accounting."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from soberana.tenant_salt import derive_salt
from tests.gateway.helpers import backend, concurrently, config, tenant

ACME, GLOBEX = "sk-acme", "sk-globex"


@pytest.fixture
def one_backend(upstreams, start_gateway):
    upstream = upstreams("up")

    def start(*tenants: dict, **backend_fields):
        return start_gateway(
            config(
                {
                    "m": [backend("up", upstream, **backend_fields)],
                    "secret": [backend("up2", upstream)],
                    "cloud-only": [backend("cloud", upstream, kind="openai", privacy="external")],
                },
                list(tenants),
            )
        ), upstream

    return start


def assert_openai_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["X-Request-Id"]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    return error


def test_missing_or_wrong_api_key_gets_401(one_backend):
    gw, upstream = one_backend(tenant("acme", ACME))
    assert_openai_error(gw.chat(None), 401, "invalid_api_key")
    assert_openai_error(gw.chat("sk-wrong"), 401, "invalid_api_key")
    assert_openai_error(
        httpx.get(gw.url + "/v1/models", headers={"Authorization": "Bearer nope"}),
        401,
        "invalid_api_key",
    )
    assert upstream.received == []


def test_unknown_or_forbidden_model_gets_404(one_backend):
    gw, upstream = one_backend(tenant("acme", ACME, models=["m"]))
    assert (
        "does not exist"
        in assert_openai_error(gw.chat(ACME, model="gpt-17"), 404, "model_not_found")["message"]
    )
    assert_openai_error(gw.chat(ACME, model="secret"), 404, "model_not_found")
    assert upstream.received == []


def test_malformed_bodies_get_400(one_backend):
    gw, _ = one_backend(tenant("acme", ACME))
    headers = {"Authorization": f"Bearer {ACME}", "Content-Type": "application/json"}
    url = gw.url + "/v1/chat/completions"
    assert_openai_error(httpx.post(url, content=b"{not json", headers=headers), 400, "invalid_json")
    assert_openai_error(httpx.post(url, content=b"[1, 2]", headers=headers), 400, "invalid_json")
    assert_openai_error(
        gw.post("/v1/chat/completions", ACME, {"messages": []}), 400, "missing_model"
    )


def test_model_list_shows_only_what_the_tenant_may_use(one_backend):
    gw, _ = one_backend(
        tenant("acme", ACME, models=["m", "cloud-only"], privacy=["onprem"]),
        tenant("globex", GLOBEX, privacy=["onprem", "external"]),
    )

    def listed(key: str) -> list[str]:
        r = httpx.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.json()["object"] == "list"
        return sorted(m["id"] for m in r.json()["data"])

    assert listed(ACME) == ["m"]  # cloud-only's backends are external, which acme may not use
    assert listed(GLOBEX) == ["cloud-only", "m", "secret"]
    r = httpx.get(gw.url + "/v1/models/m", headers={"Authorization": f"Bearer {ACME}"})
    assert r.status_code == 200 and r.json()["id"] == "m"
    assert_openai_error(
        httpx.get(gw.url + "/v1/models/secret", headers={"Authorization": f"Bearer {ACME}"}),
        404,
        "model_not_found",
    )


def test_a_model_served_only_outside_the_tenants_privacy_classes_gets_403(one_backend):
    gw, upstream = one_backend(tenant("acme", ACME, privacy=["onprem"]))
    error = assert_openai_error(gw.chat(ACME, model="cloud-only"), 403, "privacy_class_not_allowed")
    assert "onprem" in error["message"]
    assert upstream.received == []


def test_requests_per_minute_limit_returns_429_with_retry_after(one_backend):
    gw, upstream = one_backend(
        tenant("acme", ACME, requests_per_minute=3), tenant("globex", GLOBEX)
    )
    assert [gw.chat(ACME, content=f"q{i}").status_code for i in range(3)] == [200, 200, 200]
    r = gw.chat(ACME, content="one too many")
    error = assert_openai_error(r, 429, "rate_limit_exceeded")
    assert "3 requests per minute" in error["message"]
    assert 1 <= int(r.headers["Retry-After"]) <= 20  # one request refills in 60/3 = 20 s
    assert gw.chat(GLOBEX).status_code == 200  # other tenants are unaffected
    assert len(upstream.received) == 4
    assert (
        gw.metric("soberana_gateway_rejections_total", tenant="acme", reason="rate_limit_exceeded")
        == 1
    )


def test_tokens_per_minute_limit_counts_reported_usage(one_backend):
    # The upstream reports 7 prompt + 3 completion tokens per request; each small request
    # reserves its estimate (13-17 tokens) up front and is settled to 10 when it ends.
    gw, upstream = one_backend(tenant("acme", ACME, tokens_per_minute=40))
    codes = [gw.chat(ACME, content=c).status_code for c in "abc"]
    assert codes == [200, 200, 200]  # 40 - 2 * 10 = 20 left: the third still fits
    r = gw.chat(ACME, content="d")  # 10 left, fewer than the request needs
    assert_openai_error(r, 429, "rate_limit_exceeded")
    assert int(r.headers["Retry-After"]) >= 1
    assert len(upstream.received) == 3
    assert gw.metric("soberana_gateway_tenant_tokens_total", tenant="acme", type="prompt") == 21
    assert gw.metric("soberana_gateway_tenant_tokens_total", tenant="acme", type="completion") == 9


def test_tokens_per_minute_limit_reserves_prompt_and_max_tokens_up_front(upstreams, start_gateway):
    slow = upstreams("slow", delay_s=1.0)
    gw = start_gateway(
        config({"m": [backend("slow", slow)]}, [tenant("acme", ACME, tokens_per_minute=100)])
    )
    # Each needs about 17 prompt + 30 max_tokens: two fit in 100, a third at once does not
    # (a limit checked only for "any token left" admitted all three).
    responses = concurrently(lambda i: gw.chat(ACME, content=f"q{i}", max_tokens=30), 3)
    assert sorted(r.status_code for r in responses) == [200, 200, 429]
    too_big = gw.chat(ACME, content="essay", max_tokens=200)
    error = assert_openai_error(too_big, 429, "rate_limit_exceeded")
    assert "more than" in error["message"] and "100 tokens per minute" in error["message"]
    assert len(slow.received) == 2
    # The two served used 10 tokens each, not the 47 reserved: the rest was given back.
    assert gw.chat(ACME, content="again", max_tokens=30).status_code == 200


def test_streamed_usage_is_counted_but_not_shown_unless_asked(one_backend):
    gw, upstream = one_backend(tenant("acme", ACME))
    with httpx.stream(
        "POST",
        gw.url + "/v1/chat/completions",
        json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {ACME}"},
    ) as r:
        text = r.read().decode()
    # The gateway asked the backend for usage on the client's behalf, then dropped that event.
    assert upstream.received[-1].body["stream_options"] == {"include_usage": True}
    assert '"usage"' not in text and text.count("data: ") == 5 and text.endswith("data: [DONE]\n\n")
    assert gw.metric("soberana_gateway_tenant_tokens_total", tenant="acme", type="completion") == 4

    with httpx.stream(
        "POST",
        gw.url + "/v1/chat/completions",
        json={
            "model": "m",
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [],
        },
        headers={"Authorization": f"Bearer {ACME}"},
    ) as r:
        assert '"usage"' in r.read().decode()  # asked for: passed through


def test_tenant_concurrency_cap_refuses_the_extra_request(upstreams, start_gateway):
    slow = upstreams("slow", delay_s=1.0)
    gw = start_gateway(
        config({"m": [backend("slow", slow)]}, [tenant("acme", ACME, max_concurrency=2)])
    )
    codes = sorted(r.status_code for r in concurrently(lambda i: gw.chat(ACME, content=f"q{i}"), 3))
    assert codes == [200, 200, 429]
    assert gw.chat(ACME).status_code == 200  # slots are returned when requests finish


def test_each_tenant_salt_reaches_soberana_backends_and_clients_cannot_replace_it(one_backend):
    gw, upstream = one_backend(
        tenant("acme", ACME), tenant("globex", GLOBEX, cache_salt="globex-salt"), kind="soberana"
    )
    gw.chat(ACME, content="x")
    gw.chat(GLOBEX, content="x")
    gw.chat(ACME, content="x", cache_salt="globex-salt")  # an attempt to share globex's blocks
    acme_salt, globex_salt, forged = (r.body["cache_salt"] for r in upstream.received)
    assert globex_salt == "globex-salt"
    assert acme_salt and acme_salt != globex_salt
    assert forged == f"{acme_salt}:globex-salt"  # still under acme's salt: a sub-partition only


def test_derived_tenant_salts_are_keyed_by_the_gateway_secret(one_backend, monkeypatch):
    # Issue 17 item 3: sha256("soberana-tenant:" + name) let anyone who reaches a backend
    # compute a tenant's salt and probe its prefix cache.
    monkeypatch.setenv("SOBERANA_TENANT_SALT_SECRET", "the gateway's own secret, 32+ bytes")
    gw, upstream = one_backend(tenant("acme", ACME), kind="soberana")
    assert gw.chat(ACME, content="x").status_code == 200
    salt = upstream.received[-1].body["cache_salt"]
    assert salt != hashlib.sha256(b"soberana-tenant:acme").hexdigest()[:32]
    secret = b"the gateway's own secret, 32+ bytes"
    assert salt == derive_salt(secret, "soberana-tenant", "acme")[:32]


def test_backends_get_their_own_key_and_model_name_never_the_clients(one_backend, monkeypatch):
    monkeypatch.setenv("SOBERANA_TEST_CLOUD_KEY", "sk-cloud-secret")
    gw, upstream = one_backend(
        tenant("acme", ACME), api_key_env="SOBERANA_TEST_CLOUD_KEY", kind="openai"
    )
    r = gw.chat(ACME, content="x", cache_salt="mine")
    assert r.status_code == 200
    seen = upstream.received[-1]
    assert seen.headers["Authorization"] == "Bearer sk-cloud-secret"
    assert seen.body["model"] == "upstream-up"
    assert "cache_salt" not in seen.body  # openai-kind backends do not take the field
    assert seen.headers["X-Request-Id"] == r.headers["X-Request-Id"]
