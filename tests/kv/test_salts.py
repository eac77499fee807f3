"""Tenants' salts: blocks of identical tokens under different salts never share a name, so one
tenant can neither reuse nor probe another's blocks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from soberana.engine.block_hash import chain_hashes
from soberana.kv.host_tier import HostTier
from soberana.kv.shared_dir_tier import SharedDirTier
from soberana.kv.warehouse import KVWarehouse
from tests.kv.helpers import make_cache, make_hashes, small_layout

LAYOUT = small_layout()
ROOT = LAYOUT.fingerprint  # the engine's hash seed


@settings(max_examples=200, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 2**31), min_size=4, max_size=40),
    salt_a=st.one_of(st.none(), st.text(max_size=12)),
    salt_b=st.one_of(st.none(), st.text(max_size=12)),
)
def test_different_salts_never_name_a_block_alike(tokens, salt_a, salt_b):
    # The engine treats "" like no salt; any other difference must give disjoint names.
    if (salt_a or None) == (salt_b or None):
        return
    a = chain_hashes(ROOT, tokens, LAYOUT.block_size, salt_a)
    b = chain_hashes(ROOT, tokens, LAYOUT.block_size, salt_b)
    assert a and not set(a) & set(b)


def test_a_tenant_cannot_find_or_read_another_tenants_blocks(tmp_path):
    warehouse = KVWarehouse(
        LAYOUT,
        host=HostTier(LAYOUT, 16 * LAYOUT.block_nbytes),
        shared=[SharedDirTier(tmp_path, 1 << 20, LAYOUT)],
    )
    try:
        tenant_a = make_hashes(LAYOUT, 6, salt="tenant-a", seed=3)
        tenant_b = make_hashes(LAYOUT, 6, salt="tenant-b", seed=3)  # the same document
        cache = make_cache(LAYOUT, 6)
        for i, h in enumerate(tenant_a):
            warehouse.put_async(h, cache[:, :, i])
        assert warehouse.flush(timeout=10)
        assert warehouse.lookup_prefix(tenant_a) == ["host"] * 6
        assert warehouse.lookup_prefix(tenant_b) == []
        assert [warehouse.get(h) for h in tenant_b] == [None] * 6
        assert warehouse.lookup_prefix(make_hashes(LAYOUT, 6, salt=None, seed=3)) == []
    finally:
        warehouse.close()
