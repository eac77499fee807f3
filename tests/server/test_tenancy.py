"""Tenants (API keys, refined by a header) never share KV blocks; a tenant reuses its own.
Their cache salts are keyed by the server's secret, so nobody can compute another's."""

from __future__ import annotations

import hashlib

import pytest

from soberana.cli import main
from soberana.server.tenancy import effective_cache_salt
from soberana.tenant_salt import derive_salt, load_salt_secret
from tests.server.helpers import API_KEY, ServerProcess

PROMPT = "The engine reads a prompt, splits it into tokens, and fills a cache of keys " * 4
FIRST = {"Authorization": f"Bearer {API_KEY}"}
SECOND = {"Authorization": "Bearer second-key"}


def _cached(server, headers: dict[str, str], salt: str | None = None) -> int:
    body = {"model": "soberana-demo", "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
    if salt is not None:
        body["cache_salt"] = salt
    r = server.post("/v1/completions", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


@pytest.fixture(scope="module")
def two_tenants(tmp_path_factory):
    """API_KEY plus a second tenant, sub-tenants by header, salts keyed by a secret file."""
    tmp = tmp_path_factory.mktemp("tenancy")
    secret = tmp / "salt-secret"
    secret.write_text("an operator's secret of enough bytes\n")
    secret.chmod(0o600)
    proc = ServerProcess(
        tmp / "server.log", "--api-key", "second-key", "--tenant-header", "X-Tenant-Id",
        "--tenant-salt-secret-file", str(secret),
    )
    try:
        yield proc.start()
    finally:
        proc.stop()


def test_each_api_key_is_a_tenant_whose_cache_others_cannot_reuse(two_tenants):
    server = two_tenants
    assert _cached(server, FIRST) == 0
    assert _cached(server, FIRST) > 0  # the same tenant reuses its blocks
    assert _cached(server, SECOND) == 0  # the other tenant cannot
    assert _cached(server, FIRST, salt="team-a") == 0  # a client salt subdivides its tenant
    assert server.post("/v1/completions", json={"model": "soberana-demo", "prompt": "hi"},
                       headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert "random one" not in server.log()  # the secret file was used


def test_the_tenant_header_only_refines_the_tenant_of_the_key(two_tenants):
    server = two_tenants
    hospital = {**FIRST, "X-Tenant-Id": "hospital"}
    assert _cached(server, hospital, salt="h") == 0
    assert _cached(server, hospital, salt="h") > 0
    assert _cached(server, {**FIRST, "X-Tenant-Id": "bank"}, salt="h") == 0
    # Key B naming the first key's sub-tenant gets its own, empty cache (issue 17 item 4:
    # it used to hit the first key's "hospital" blocks).
    assert _cached(server, {**SECOND, "X-Tenant-Id": "hospital"}, salt="h") == 0
    # The header's sub-tenants are not the key's own tenant.
    assert _cached(server, FIRST, salt="h") == 0


def test_cache_salts_are_keyed_by_the_server_secret_not_derivable_from_the_name():
    one, other = b"s" * 32, b"t" * 32
    scope = {"state": {"tenant": "key:abc", "salt_secret": one}}
    salt = effective_cache_salt(scope, "team-a")
    assert salt == derive_salt(one, "key:abc") + "|" + derive_salt(one, "key:abc", "team-a")
    # The tenant's part (its KV namespace in shared tiers) is the same with or without a
    # client salt, so a purge of the tenant reaches both.
    assert salt.split("|")[0] == effective_cache_salt(scope, None)
    assert salt != effective_cache_salt({"state": {**scope["state"], "salt_secret": other}}, "team-a")
    assert salt != hashlib.sha256(b"key:abc|team-a").hexdigest()
    # A client without a tenant cannot send a salt that lands in a tenant's partition.
    anonymous = {"state": {"tenant": None, "salt_secret": one}}
    assert effective_cache_salt(anonymous, "key:abc|team-a") not in (salt, "key:abc|team-a")
    assert effective_cache_salt(anonymous, None) is None  # anonymous requests share blocks


def test_a_short_salt_secret_is_refused(tmp_path, monkeypatch):
    short = tmp_path / "short"
    short.write_text("too short")
    with pytest.raises(ValueError, match="at least 16"):
        load_salt_secret(str(short))
    monkeypatch.setenv("SOBERANA_TENANT_SALT_SECRET", "x" * 20)
    assert load_salt_secret() == b"x" * 20


def test_tenant_header_without_api_keys_refuses_to_start(monkeypatch, capsys):
    monkeypatch.delenv("SOBERANA_API_KEY", raising=False)
    assert main(["serve", "demo", "--port", "0", "--tenant-header", "X-Tenant-Id"]) == 2
    # `serve` configures logging itself (--log-format), replacing pytest's capture handler.
    assert "--tenant-header needs --api-key" in capsys.readouterr().err
