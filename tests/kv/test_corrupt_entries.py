"""Corrupt, truncated, foreign-layout and other-model entries are misses in every stored tier:
never loaded, never a wrong block, and removed so that they stop costing reads."""

from __future__ import annotations

import pytest
import torch

from soberana.kv.disk_tier import DiskTier
from soberana.kv.entry import HEADER_SIZE, encode_entry
from soberana.kv.entry_files import entry_path
from soberana.kv.redis_tier import RedisTier
from soberana.kv.shared_dir_tier import SharedDirTier
from soberana.kv.warehouse import KVWarehouse
from tests.kv.helpers import block_bytes, make_cache, make_hashes, small_layout

LAYOUT = small_layout()


def flip(raw: bytes, index: int) -> bytes:
    damaged = bytearray(raw)
    damaged[index] ^= 0x01
    return bytes(damaged)


def payload_of(raw: bytes) -> bytes:
    return raw[HEADER_SIZE:]


DAMAGE = {
    "bit-flip-in-payload": lambda key, raw, other: flip(raw, len(raw) - 7),
    "bit-flip-in-header": lambda key, raw, other: flip(raw, 40),
    "truncated": lambda key, raw, other: raw[: len(raw) // 2],
    "empty": lambda key, raw, other: b"",
    "foreign-layout": lambda key, raw, other: encode_entry(
        small_layout(num_kv_heads=4, head_dim=4), key, payload_of(raw)
    ),
    "other-model": lambda key, raw, other: encode_entry(
        small_layout(model="another-model"), key, payload_of(raw)
    ),
    "another-blocks-entry": lambda key, raw, other: other,
}


class Medium:
    """A store plus raw access to the bytes under it, to damage them as the world would."""

    def __init__(self, kind: str, tmp_path, start_redis) -> None:
        self.kind = kind
        if kind == "disk":
            self.store = DiskTier(tmp_path, 1 << 20, LAYOUT)
        elif kind == "shared_dir":
            self.store = SharedDirTier(tmp_path, 1 << 20, LAYOUT)
        else:
            self.server = start_redis()
            self.store = RedisTier(self.server.url, LAYOUT)

    def _redis_key(self, key: bytes) -> str:
        return f"soberana:kv:{LAYOUT.namespace}:{key.hex()}"

    def read_raw(self, key: bytes) -> bytes:
        if self.kind == "redis":
            return self.server.client.get(self._redis_key(key))
        return entry_path(self._root, key).read_bytes()

    def write_raw(self, key: bytes, raw: bytes) -> None:
        if self.kind == "redis":
            self.server.client.set(self._redis_key(key), raw)
        else:
            entry_path(self._root, key).write_bytes(raw)

    @property
    def _root(self):
        return self.store.root if self.kind == "disk" else self.store.layout_root


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("kind", ["disk", "shared_dir", "redis"])
def test_a_damaged_entry_is_a_miss_and_is_removed(kind, damage, tmp_path, start_redis):
    medium = Medium(kind, tmp_path, start_redis)
    hashes = make_hashes(LAYOUT, 3)
    cache = make_cache(LAYOUT, 3)
    for i, h in enumerate(hashes):
        medium.store.put(h, encode_entry(LAYOUT, h, block_bytes(cache, i)))
    bad = hashes[1]
    medium.write_raw(bad, DAMAGE[damage](bad, medium.read_raw(bad), medium.read_raw(hashes[0])))
    if kind == "disk":
        warehouse = KVWarehouse(LAYOUT, disk=medium.store)
    else:
        warehouse = KVWarehouse(LAYOUT, shared=[medium.store])
    try:
        engine_cache = torch.zeros(LAYOUT.num_layers, 2, 3, *LAYOUT.block_shape[2:])
        handle = warehouse.load_async(hashes, engine_cache, [0, 1, 2])
        assert handle.wait(timeout=10) == 1  # the good block before the damaged one
        assert torch.equal(engine_cache[:, :, 0], cache[:, :, 0])
        assert not engine_cache[:, :, 1:].any()
        assert warehouse.get(bad) is None
        assert warehouse.get(hashes[2]) == block_bytes(cache, 2)
        assert warehouse.lookup_prefix(hashes) == [kind]  # the damaged entry is gone
        assert warehouse.stats().tiers[kind].rejected == 1
    finally:
        warehouse.close()
