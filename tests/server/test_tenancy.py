"""Tenants (API keys, or a trusted header) never share KV blocks; a tenant reuses its own."""

from __future__ import annotations

from tests.server.helpers import API_KEY

PROMPT = "The engine reads a prompt, splits it into tokens, and fills a cache of keys " * 4


def _cached(server, headers: dict[str, str], salt: str | None = None) -> int:
    body = {"model": "soberana-demo", "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
    if salt is not None:
        body["cache_salt"] = salt
    r = server.post("/v1/completions", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_each_api_key_is_a_tenant_whose_cache_others_cannot_reuse(start_server):
    server = start_server("--api-key", "second-key")  # API_KEY plus a second tenant
    first = {"Authorization": f"Bearer {API_KEY}"}
    second = {"Authorization": "Bearer second-key"}
    assert _cached(server, first) == 0
    assert _cached(server, first) > 0  # the same tenant reuses its blocks
    assert _cached(server, second) == 0  # the other tenant cannot
    assert _cached(server, first, salt="team-a") == 0  # a client salt subdivides its tenant
    assert server.post("/v1/completions", json={"model": "soberana-demo", "prompt": "hi"},
                       headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_a_trusted_tenant_header_separates_tenants(start_server):
    server = start_server("--tenant-header", "X-Tenant-Id")
    assert _cached(server, {"X-Tenant-Id": "hospital"}) == 0
    assert _cached(server, {"X-Tenant-Id": "hospital"}) > 0
    assert _cached(server, {"X-Tenant-Id": "bank"}) == 0
