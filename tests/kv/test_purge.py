"""`soberana kv purge`: one tenant's shared-tier entries go, every other tenant's stay."""

from __future__ import annotations

import pytest

from soberana.cli import main
from soberana.kv.codec import SEALED_HEADER_SIZE
from soberana.kv.namespace import tenant_namespace, tenant_salt_of
from soberana.kv.redis_tier import RedisTier
from soberana.kv.shared_dir_tier import SharedDirTier
from tests.kv.helpers import make_cache, make_hashes, small_layout

LAYOUT = small_layout()
OTHER_LAYOUT = small_layout(model="another-model")
KEY = "the replicas' shared secret, 32+"


def test_a_tenants_salts_share_one_namespace_and_tenants_differ():
    key = KEY.encode()
    assert tenant_salt_of("acme|chat-1") == tenant_salt_of("acme|chat-2") == "acme"
    assert tenant_salt_of(None) == tenant_salt_of("") == ""
    assert tenant_namespace("acme", key) != tenant_namespace("globex", key)
    assert tenant_namespace("acme", key) != tenant_namespace("acme", b"another domain's key")
    assert tenant_namespace("", key) == ""


@pytest.fixture
def fleet(tmp_path, start_redis, warehouses):
    """Two layouts' warehouses over one Redis and one shared directory, each holding blocks
    of tenants acme and globex and unsalted ones."""
    server = start_redis()
    made = {}
    for layout in (LAYOUT, OTHER_LAYOUT):
        size = SEALED_HEADER_SIZE + layout.block_nbytes
        shared = [
            RedisTier(server.url, layout, stored_entry_size=size),
            SharedDirTier(tmp_path / "shared", 1 << 20, layout, stored_entry_size=size),
        ]
        w = warehouses(layout, shared=shared, shared_key=KEY.encode())
        blocks = {}
        for n, salt in enumerate(("acme|chat-1", "acme|chat-2", "globex|chat-1", None)):
            hashes = make_hashes(layout, 3, salt=salt, seed=n)
            cache = make_cache(layout, 3, seed=n)
            ns = w.namespace_of(salt)
            for i, h in enumerate(hashes):
                assert w.put_async(h, cache[:, :, i], ns)
            blocks[salt] = (hashes, ns)
        assert w.flush(timeout=10)
        made[layout] = (w, blocks)
    return server, tmp_path / "shared", made


def held(w, hashes, ns) -> list[list[bool]]:
    return [store.contains_many(hashes, ns) for store in w.shared]


def test_purge_removes_one_tenants_entries_from_every_shared_tier_and_layout(fleet, capsys):
    server, shared_dir, made = fleet
    argv = ["kv", "purge", "--salt", "acme", "--kv-redis-url", server.url,
            "--kv-shared-dir", str(shared_dir), "--kv-shared-key-file"]  # fmt: skip
    key_file = shared_dir.parent / "kv.key"
    key_file.write_text(KEY)
    assert main([*argv, str(key_file)]) == 0
    out = capsys.readouterr().out
    assert "redis: removed 12 entries" in out  # 2 layouts x 2 salts x 3 blocks
    assert "shared_dir: removed 12 entries" in out
    for w, blocks in made.values():
        for salt, (hashes, ns) in blocks.items():
            expected = salt is None or not salt.startswith("acme")
            assert held(w, hashes, ns) == [[expected] * 3] * 2, salt
            if expected:  # and what stays still loads
                assert all(w.get(h, ns) is not None for h in hashes)


def test_purge_by_tenant_name_uses_the_servers_salt_derivation(fleet, capsys, tmp_path):
    """`--tenant` asks the server's own salt function for the tenant's salt."""
    from soberana.server.tenancy import effective_cache_salt

    server, shared_dir, made = fleet
    w, _ = made[LAYOUT]
    salt = effective_cache_salt({"state": {"tenant": "key:abc", "salt_secret": b"s" * 32}}, "c")
    hashes = make_hashes(LAYOUT, 2, salt=salt, seed=9)
    ns = w.namespace_of(salt)
    cache = make_cache(LAYOUT, 2)
    for i, h in enumerate(hashes):
        assert w.put_async(h, cache[:, :, i], ns)
    assert w.flush(timeout=10)
    (tmp_path / "salt.secret").write_bytes(b"s" * 32)
    (tmp_path / "kv.key").write_text(KEY)
    assert main(["kv", "purge", "--tenant", "key:abc", "--kv-redis-url", server.url,
                 "--tenant-salt-secret-file", str(tmp_path / "salt.secret"),
                 "--kv-shared-key-file", str(tmp_path / "kv.key")]) == 0  # fmt: skip
    assert w.shared[0].contains_many(hashes, ns) == [False, False]
    others = made[LAYOUT][1]["globex|chat-1"]
    assert w.shared[0].contains_many(*others) == [True] * 3


def test_purge_refuses_without_a_tier_or_a_key(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SOBERANA_KV_SHARED_KEY", raising=False)
    assert main(["kv", "purge", "--salt", "acme"]) == 2
    assert main(["kv", "purge", "--salt", "acme", "--kv-shared-dir", str(tmp_path)]) == 2
    assert "need a key" in capsys.readouterr().err
