"""Redis tier against a real redis-server: sharing, server-side LRU capacity, TTL."""

from __future__ import annotations

import logging
import time

import redis

from soberana.kv.entry import decode_entry, encode_entry
from soberana.kv.redis_tier import RedisTier
from tests.kv.helpers import make_hashes, small_layout


def entry_for(layout, key: bytes, fill: int = 0) -> bytes:
    return encode_entry(layout, key, bytes([fill]) * layout.block_nbytes)


def test_round_trip(layout, start_redis):
    server = start_redis("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
    tier = RedisTier(server.url, layout)
    key, absent = make_hashes(layout, 2)
    assert tier.put(key, entry_for(layout, key, 4)) is True
    assert bytes(decode_entry(layout, key, tier.get(key))) == bytes([4]) * layout.block_nbytes
    assert tier.put(key, entry_for(layout, key, 4)) is False  # first writer wins
    assert tier.contains_many([key, absent]) == [True, False]
    assert tier.get(absent) is None
    assert tier.usage().capacity_bytes == 64 << 20
    tier.close()


def test_replicas_share_blocks_and_keep_other_layouts_apart(layout, start_redis):
    server = start_redis()
    replica_a, replica_b = RedisTier(server.url, layout), RedisTier(server.url, layout)
    other = RedisTier(server.url, small_layout(model="another-model"))
    key = make_hashes(layout, 1)[0]
    replica_a.put(key, entry_for(layout, key, 6))
    assert bytes(decode_entry(layout, key, replica_b.get(key))) == bytes([6]) * layout.block_nbytes
    assert other.contains_many([key]) == [False]
    for tier in (replica_a, replica_b, other):
        tier.close()


def test_the_server_evicts_least_recently_used_blocks_across_replicas(start_redis):
    layout = small_layout(num_layers=32, block_size=16)  # 64 KiB blocks: ~23 fit below
    # Sampling every key makes Redis's approximate LRU exact at this size.
    server = start_redis("--maxmemory-policy", "allkeys-lru", "--maxmemory-samples", "64")
    replicas = [RedisTier(server.url, layout) for _ in range(2)]
    server.client.config_set(
        "maxmemory", server.client.info("memory")["used_memory"] + (1536 << 10)
    )
    old = make_hashes(layout, 10, seed=1)
    for i, key in enumerate(old):
        replicas[i % 2].put(key, entry_for(layout, key))
    time.sleep(2.1)  # Redis's LRU clock counts whole seconds
    used_again = old[:5]
    for key in used_again:
        assert replicas[1].get(key) is not None
    written = []
    for i, key in enumerate(make_hashes(layout, 100, seed=2)):
        if server.client.info("stats")["evicted_keys"] >= 4:
            break
        replicas[i % 2].put(key, entry_for(layout, key))
        written.append(key)
    survivors = replicas[0].contains_many(used_again + written)
    missing_old = replicas[0].contains_many(old[5:]).count(False)
    evicted = server.client.info("stats")["evicted_keys"]
    memory = server.client.info("memory")
    assert memory["used_memory"] <= memory["maxmemory"]
    # Every block used since the pause survives; the evicted ones are all unused old blocks.
    assert survivors == [True] * (5 + len(written))
    assert missing_old == evicted >= 4
    assert all(r.eviction_policy == "allkeys-lru" for r in replicas)


def test_a_full_redis_that_does_not_evict_refuses_writes(layout, start_redis):
    server = start_redis("--maxmemory", "1mb", "--maxmemory-policy", "noeviction")
    tier = RedisTier(server.url, layout)
    refused = None
    for key in make_hashes(layout, 2000):
        try:
            tier.put(key, entry_for(layout, key))
        except redis.exceptions.OutOfMemoryError as e:
            refused = e
            break
    assert refused is not None
    tier.close()


def test_with_a_ttl_unused_blocks_expire_and_reads_renew_them(layout, start_redis):
    server = start_redis()
    tier = RedisTier(server.url, layout, ttl_s=0.6)
    kept, dropped = make_hashes(layout, 2)
    tier.put(kept, entry_for(layout, kept))
    tier.put(dropped, entry_for(layout, dropped))
    for _ in range(3):
        time.sleep(0.3)
        assert tier.get(kept) is not None
    time.sleep(0.1)
    assert tier.contains_many([kept, dropped]) == [True, False]
    time.sleep(0.7)
    assert tier.contains_many([kept]) == [False]
    tier.close()


def test_a_redis_that_never_evicts_is_reported_at_start(layout, start_redis, caplog):
    server = start_redis()  # maxmemory 0: grows until the machine runs out
    with caplog.at_level(logging.WARNING, logger="soberana.kv.redis_tier"):
        RedisTier(server.url, layout).close()
    assert "will not be evicted" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="soberana.kv.redis_tier"):
        RedisTier(server.url, layout, ttl_s=60).close()
    assert caplog.text == ""
