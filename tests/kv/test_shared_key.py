"""Shared tiers sealed with the replicas' key: whoever can write Redis or the shared directory
but lacks the key cannot make a replica load a block of their choosing, nor read KV."""

from __future__ import annotations

import argparse

import pytest
import torch

from soberana.kv.codec import SEALED_HEADER_SIZE
from soberana.kv.config import SHARED_KEY_ENV, add_arguments, config_from_args
from soberana.kv.entry import encode_entry
from soberana.kv.entry_files import entry_path
from soberana.kv.redis_tier import RedisTier
from soberana.kv.shared_dir_tier import SharedDirTier
from tests.kv.helpers import block_bytes, make_cache, make_hashes, small_layout

LAYOUT = small_layout()
KEY = b"the replicas' shared secret, 32+"
SEALED_SIZE = SEALED_HEADER_SIZE + LAYOUT.block_nbytes


class SharedMedium:
    """A shared store plus raw access to it, as someone with write access to it has."""

    def __init__(self, kind: str, tmp_path, start_redis, entry_size: int) -> None:
        self.kind = kind
        if kind == "redis":
            self.server = start_redis()
            self.store = RedisTier(self.server.url, LAYOUT, stored_entry_size=entry_size)
        else:
            self.store = SharedDirTier(tmp_path, 1 << 20, LAYOUT, stored_entry_size=entry_size)

    def _redis_key(self, key: bytes, namespace: str) -> str:
        tenant = f"t{namespace}:" if namespace else ""
        return f"soberana:kv:{LAYOUT.namespace}:{tenant}{key.hex()}"

    def _path(self, key: bytes, namespace: str):
        root = self.store.layout_root / f"t{namespace}" if namespace else self.store.layout_root
        return entry_path(root, key)

    def read_raw(self, key: bytes, namespace: str = "") -> bytes:
        if self.kind == "redis":
            return self.server.client.get(self._redis_key(key, namespace))
        return self._path(key, namespace).read_bytes()

    def write_raw(self, key: bytes, raw: bytes, namespace: str = "") -> None:
        if self.kind == "redis":
            self.server.client.set(self._redis_key(key, namespace), raw)
        else:
            path = self._path(key, namespace)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(raw)


def load(warehouse, hashes, namespace: str = "") -> tuple[int, torch.Tensor]:
    dst = torch.zeros(LAYOUT.num_layers, 2, len(hashes), *LAYOUT.block_shape[2:])
    n = warehouse.load_async(hashes, dst, list(range(len(hashes))), namespace).wait(timeout=10)
    return n, dst


def put(warehouse, hashes, cache, namespace: str = "") -> None:
    for i, h in enumerate(hashes):
        assert warehouse.put_async(h, cache[:, :, i], namespace)
    assert warehouse.flush(timeout=10)


KINDS = ["redis", "shared_dir"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_forged_entry_with_a_valid_unkeyed_checksum_is_refused(
    kind, tmp_path, start_redis, warehouses
):
    medium = SharedMedium(kind, tmp_path, start_redis, SEALED_SIZE)
    w = warehouses(LAYOUT, shared=[medium.store], shared_key=KEY)
    victim, other = make_hashes(LAYOUT, 2)
    cache = make_cache(LAYOUT, 2)
    put(w, [victim], cache)
    # The attacker stores another block's payload under the victim's name, in the checked
    # format with a correct XXH3 checksum (what a replica without a key would accept).
    medium.write_raw(victim, encode_entry(LAYOUT, victim, block_bytes(cache, 1)))
    n, dst = load(w, [victim])
    assert n == 0 and not dst.any()
    assert w.get(victim) is None
    assert w.stats().tiers[kind].rejected >= 1


@pytest.mark.parametrize("kind", KINDS)
def test_without_a_key_the_same_forgery_is_loaded(kind, tmp_path, start_redis, warehouses):
    """What the key protects: a trusted (unkeyed) shared tier loads the forged block."""
    medium = SharedMedium(kind, tmp_path, start_redis, LAYOUT.block_nbytes + 96)
    w = warehouses(LAYOUT, shared=[medium.store])
    victim = make_hashes(LAYOUT, 1)[0]
    cache = make_cache(LAYOUT, 2)
    medium.write_raw(victim, encode_entry(LAYOUT, victim, block_bytes(cache, 1)))
    assert w.get(victim) == block_bytes(cache, 1)  # another block's KV, silently


@pytest.mark.parametrize("kind", KINDS)
def test_a_sealed_entry_replayed_under_another_blocks_name_is_refused(
    kind, tmp_path, start_redis, warehouses
):
    medium = SharedMedium(kind, tmp_path, start_redis, SEALED_SIZE)
    w = warehouses(LAYOUT, shared=[medium.store], shared_key=KEY)
    a, b = make_hashes(LAYOUT, 2)
    cache = make_cache(LAYOUT, 2)
    put(w, [a, b], cache)
    medium.write_raw(a, medium.read_raw(b))  # genuine, but block b's
    assert w.get(a) is None
    assert w.get(b) == block_bytes(cache, 1)


@pytest.mark.parametrize("kind", KINDS)
def test_a_tenants_entry_moved_into_another_tenants_namespace_is_refused(
    kind, tmp_path, start_redis, warehouses
):
    medium = SharedMedium(kind, tmp_path, start_redis, SEALED_SIZE)
    w = warehouses(LAYOUT, shared=[medium.store], shared_key=KEY)
    ns_a, ns_b = w.namespace_of("tenant-a|x"), w.namespace_of("tenant-b|x")
    h = make_hashes(LAYOUT, 1)[0]
    cache = make_cache(LAYOUT, 1)
    put(w, [h], cache, ns_a)
    medium.write_raw(h, medium.read_raw(h, ns_a), ns_b)
    assert w.get(h, ns_b) is None
    assert w.get(h, ns_a) == block_bytes(cache, 0)


@pytest.mark.parametrize("kind", KINDS)
def test_entries_sealed_with_another_key_are_refused(kind, tmp_path, start_redis, warehouses):
    medium = SharedMedium(kind, tmp_path, start_redis, SEALED_SIZE)
    intruder = warehouses(LAYOUT, shared=[medium.store], shared_key=b"a key of another domain")
    replica = warehouses(LAYOUT, shared=[medium.store], shared_key=KEY)
    h = make_hashes(LAYOUT, 1)[0]
    put(intruder, [h], make_cache(LAYOUT, 1))
    assert replica.get(h) is None
    assert replica.stats().tiers[kind].rejected == 1


@pytest.mark.parametrize("kind", KINDS)
def test_encrypted_entries_hold_no_plaintext_and_load_back(
    kind, tmp_path, start_redis, warehouses
):
    size = SEALED_SIZE
    medium = SharedMedium(kind, tmp_path, start_redis, size)
    w = warehouses(LAYOUT, shared=[medium.store], shared_key=KEY, encrypt=True)
    other = warehouses(LAYOUT, shared=[medium.store], shared_key=KEY, encrypt=True)
    hashes = make_hashes(LAYOUT, 2)
    cache = make_cache(LAYOUT, 2)
    put(w, hashes, cache)
    for i, h in enumerate(hashes):
        raw = medium.read_raw(h)
        plain = block_bytes(cache, i)
        # No 16-byte window of the payload appears in what the store holds.
        assert not any(plain[j : j + 16] in raw for j in range(0, len(plain) - 16, 16))
    n, dst = load(other, hashes)  # another replica with the key reads them
    assert n == 2 and torch.equal(dst, cache)


def parse(*argv: str):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


@pytest.mark.parametrize("tier", [["--kv-redis-url", "redis://h:6379"], ["--kv-shared-dir", "/x"]])
def test_a_shared_tier_without_a_key_refuses_to_start_unless_marked_trusted(tier, monkeypatch):
    monkeypatch.delenv(SHARED_KEY_ENV, raising=False)
    with pytest.raises(ValueError, match="need a key shared by the replicas"):
        parse(*tier)
    with pytest.raises(ValueError, match="--kv-shared-encrypt needs a key"):
        parse(*tier, "--kv-shared-encrypt", "--kv-shared-trusted")
    assert parse(*tier, "--kv-shared-trusted").shared_key() is None
    monkeypatch.setenv(SHARED_KEY_ENV, "from the environment, 16+ bytes")
    assert parse(*tier).shared_key() == b"from the environment, 16+ bytes"


def test_a_short_or_unreadable_key_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(SHARED_KEY_ENV, raising=False)
    short = tmp_path / "short.key"
    short.write_text("guessable\n")
    with pytest.raises(ValueError, match="at least 16 bytes; got 9"):
        parse("--kv-shared-dir", "/x", "--kv-shared-key-file", str(short))
    with pytest.raises(ValueError, match="--kv-shared-key-file cannot be read"):
        parse("--kv-shared-dir", "/x", "--kv-shared-key-file", str(tmp_path / "missing"))
