"""The warehouse facade: prefix lookup across tiers, loads, promotion, the write path."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from soberana.kv.calibration import decide
from soberana.kv.disk_tier import DiskTier
from soberana.kv.entry import entry_size
from soberana.kv.host_tier import HostTier
from soberana.kv.redis_tier import RedisTier
from soberana.kv.shared_dir_tier import SharedDirTier
from soberana.kv.warehouse import KVWarehouse
from tests.kv.helpers import block_bytes, make_cache, make_hashes, small_layout


def hand_over(warehouse: KVWarehouse, hashes: list[bytes], cache: torch.Tensor) -> None:
    for i, h in enumerate(hashes):
        assert warehouse.put_async(h, cache[:, :, i])
    assert warehouse.flush(timeout=10)


def test_lookup_returns_the_longest_leading_run_and_the_tier_of_each_block(
    layout, tmp_path, warehouses
):
    w = warehouses(
        layout,
        host=HostTier(layout, 4 * layout.block_nbytes),
        shared=[SharedDirTier(tmp_path, 1 << 20, layout)],
    )
    hashes = make_hashes(layout, 10)
    hand_over(w, hashes[:8], make_cache(layout, 8))
    # RAM kept the four most recent blocks; the shared directory took every block.
    assert w.lookup_prefix(hashes) == ["shared_dir"] * 4 + ["host"] * 4
    assert w.lookup_prefix([hashes[0], hashes[9], hashes[2]]) == ["shared_dir"]
    assert w.lookup_prefix(hashes[9:]) == []
    stats = w.stats()
    assert (stats.lookups, stats.lookup_blocks, stats.lookup_hit_blocks) == (3, 14, 9)
    assert stats.tiers["host"].lookup_hits == 4
    assert stats.tiers["shared_dir"].lookup_hits == 5


def test_a_load_fills_the_engine_cache_blocks_and_stops_at_the_first_missing_block(
    layout, tmp_path, warehouses
):
    w = warehouses(
        layout,
        host=HostTier(layout, 3 * layout.block_nbytes),
        shared=[SharedDirTier(tmp_path, 1 << 20, layout)],
    )
    hashes = make_hashes(layout, 8)
    source = make_cache(layout, 8, seed=1)
    hand_over(w, hashes[:6], source)
    engine_cache = torch.zeros(layout.num_layers, 2, 20, *layout.block_shape[2:])
    block_ids = [19, 3, 7, 0, 12, 5, 6, 8]  # the engine's blocks are anywhere in its pool
    handle = w.load_async(hashes, engine_cache, block_ids)
    assert handle.wait(timeout=10) == 6
    assert handle.done()
    assert handle.tiers == ["shared_dir"] * 3 + ["host"] * 3
    for i in range(6):
        assert torch.equal(engine_cache[:, :, block_ids[i]], source[:, :, i])
    assert not engine_cache[:, :, block_ids[6:]].any()  # nothing written past the gap
    stats = w.stats()
    assert stats.blocks_loaded == 6 and stats.prefill_tokens_saved == 6 * layout.block_size
    assert sum(stats.load_latency_counts) == stats.loads == 1


def test_a_cancelled_load_stops_early_and_still_finishes(layout, warehouses):
    w = warehouses(layout, host=HostTier(layout, 4 * layout.block_nbytes))
    hashes = make_hashes(layout, 4)
    hand_over(w, hashes, make_cache(layout, 4))
    cache = torch.zeros(layout.num_layers, 2, 4, *layout.block_shape[2:])
    handle = w.load_async(hashes, cache, [0, 1, 2, 3])
    handle.cancel()
    loaded = handle.wait(timeout=10)
    assert loaded is not None and loaded <= 4
    assert handle.tiers == ["host"] * loaded


def test_a_block_found_below_ram_is_promoted_into_ram(layout, tmp_path, warehouses):
    shared = SharedDirTier(tmp_path, 1 << 20, layout)
    host = HostTier(layout, 4 * layout.block_nbytes)
    writer = warehouses(layout, shared=[shared])  # another replica wrote it
    h = make_hashes(layout, 1)[0]
    cache = make_cache(layout, 1)
    hand_over(writer, [h], cache)
    w = warehouses(layout, host=host, shared=[SharedDirTier(tmp_path, 1 << 20, layout)])
    assert w.get(h) == block_bytes(cache, 0)
    assert w.flush(timeout=10)
    assert w.lookup_prefix([h]) == ["host"]
    assert w.get(h) == block_bytes(cache, 0)
    tiers = w.stats().tiers
    assert (tiers["shared_dir"].hits, tiers["host"].hits, tiers["host"].misses) == (1, 1, 1)


def test_put_async_never_waits_on_a_stalled_tier_and_drops_when_its_buffer_is_full(
    layout, start_redis, warehouses
):
    server = start_redis()
    w = warehouses(
        layout,
        shared=[RedisTier(server.url, layout)],
        write_buffer_bytes=4 * layout.block_nbytes,
    )
    hashes = make_hashes(layout, 20)
    cache = make_cache(layout, 20)
    server.client.client_pause(800, all=False)  # Redis holds every write for 0.8 s
    accepted, slowest = [], 0.0
    for i, h in enumerate(hashes):
        start = time.perf_counter()
        accepted.append(w.put_async(h, cache[:, :, i]))
        slowest = max(slowest, time.perf_counter() - start)
    assert slowest < 0.05
    assert accepted == [True] * 4 + [False] * 16
    assert w.flush(timeout=10)
    stats = w.stats()
    assert (stats.puts, stats.puts_dropped) == (4, 16)
    assert w.lookup_prefix(hashes) == ["redis"] * 4
    assert w.get(hashes[3]) == block_bytes(cache, 3)


def test_disk_takes_a_block_only_once_it_was_asked_for_twice(layout, tmp_path, warehouses):
    w = warehouses(layout, disk=DiskTier(tmp_path, 100 * entry_size(layout), layout))
    h = make_hashes(layout, 1)[0]
    cache = make_cache(layout, 1)
    hand_over(w, [h], cache)  # nobody asked for it
    assert w.disk.contains_many([h]) == [False]
    assert w.lookup_prefix([h]) == []  # first request wanting it: computed, handed over
    hand_over(w, [h], cache)
    assert w.disk.contains_many([h]) == [False]
    assert w.lookup_prefix([h]) == []  # asked for again: worth keeping
    hand_over(w, [h], cache)
    assert w.lookup_prefix([h]) == ["disk"]
    assert w.get(h) == block_bytes(cache, 0)
    assert w.stats().admission_rejected == 2


def test_ram_spills_to_disk_only_the_blocks_asked_for_twice(layout, tmp_path, warehouses):
    w = warehouses(
        layout,
        host=HostTier(layout, 2 * layout.block_nbytes),
        disk=DiskTier(tmp_path, 100 * entry_size(layout), layout),
    )
    reused, once, c, d = make_hashes(layout, 4)
    cache = make_cache(layout, 4)
    w.lookup_prefix([reused, once])
    w.lookup_prefix([reused])
    hand_over(w, [reused, once], cache[:, :, :2])
    hand_over(w, [c, d], cache[:, :, 2:])  # RAM is full: reused and once are evicted
    assert w.lookup_prefix([reused, c, d]) == ["disk", "host", "host"]
    assert w.lookup_prefix([once]) == []
    assert w.get(reused) == block_bytes(cache, 0)


def test_an_unreachable_redis_is_a_fast_miss_never_an_error(layout, start_redis, warehouses):
    server = start_redis()
    tier = RedisTier(server.url, layout, timeout_s=0.5)
    server.stop()
    w = warehouses(layout, shared=[tier], cooldown_s=60)
    hashes = make_hashes(layout, 3)
    start = time.perf_counter()
    for _ in range(20):
        assert w.lookup_prefix(hashes) == []
        assert w.get(hashes[0]) is None
    assert time.perf_counter() - start < 3  # one timeout, then the tier is skipped
    assert w.put_async(hashes[0], make_cache(layout, 1)[:, :, 0])
    assert w.flush(timeout=10)
    assert w.stats().tiers["redis"].errors >= 1


def test_calibration_keeps_only_tiers_that_load_faster_than_recompute(layout, tmp_path, warehouses):
    w = warehouses(
        layout,
        host=HostTier(layout, 4 * layout.block_nbytes),
        disk=DiskTier(tmp_path, 100 * entry_size(layout), layout),
    )
    hashes = make_hashes(layout, 2)
    hand_over(w, hashes, make_cache(layout, 2))
    assert w.lookup_prefix(hashes) == ["host", "host"]

    slow_engine = w.calibrate(prefill_tokens_per_s=1.0)
    assert slow_engine.load_tiers == ["host", "disk"]
    assert all(rate > 1.0 for rate in slow_engine.load_tokens_per_s.values())
    assert w.stats().tiers["host"].entries == 2  # the probes are gone
    assert w.stats().tiers["disk"].entries == 0

    fast_engine = w.calibrate(prefill_tokens_per_s=1e15)
    assert fast_engine.load_tiers == []
    assert w.lookup_prefix(hashes) == []  # recomputing beats loading: nothing to load
    assert w.get(hashes[0]) is None
    assert w.stats().load_tiers == []


def test_the_decision_loads_from_a_tier_exactly_when_it_is_at_least_as_fast():
    decision = decide(1000.0, {"host": 50_000.0, "disk": 1000.0, "redis": 999.0})
    assert decision.load_tiers == ["host", "disk"]
    with pytest.raises(ValueError, match="prefill_tokens_per_s must be > 0"):
        decide(0.0, {"host": 1.0})


def test_a_block_of_the_wrong_shape_or_dtype_is_refused_loudly(layout, warehouses):
    w = warehouses(layout, host=HostTier(layout, 4 * layout.block_nbytes))
    h = make_hashes(layout, 1)[0]
    with pytest.raises(ValueError, match="block must be"):
        w.put_async(h, torch.zeros(layout.block_shape, dtype=torch.float16))
    with pytest.raises(ValueError, match="block must be"):
        w.put_async(h, b"\0" * 10)
    with pytest.raises(ValueError, match="does not match"):
        w.load_async([h], torch.zeros(3, 2, 4, 4, 2, 8), [0])


def test_a_new_prompt_costs_the_shared_store_one_small_query(layout, start_redis, warehouses):
    server = start_redis()
    w = warehouses(layout, shared=[RedisTier(server.url, layout)])
    cached = make_hashes(layout, 100, seed=1)
    hand_over(w, cached, make_cache(layout, 100))

    def exists_calls() -> int:
        return server.client.info("commandstats").get("cmdstat_exists", {}).get("calls", 0)

    before = exists_calls()
    assert w.lookup_prefix(make_hashes(layout, 1000, seed=2)) == []
    assert exists_calls() - before == 16  # the first chunk misses: nothing more is asked
    before = exists_calls()
    assert w.lookup_prefix(cached + make_hashes(layout, 1000, seed=3)) == ["redis"] * 100
    assert exists_calls() - before < 250  # chunks of 16, 32, 64, 128 cover the hit and stop


@settings(max_examples=25, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["put", "lookup", "get", "load"]), st.integers(0, 11)),
        min_size=1,
        max_size=40,
    )
)
def test_any_sequence_of_operations_returns_only_true_blocks_within_capacity(ops):
    layout = small_layout()
    hashes = make_hashes(layout, 12)
    cache = make_cache(layout, 12)
    with tempfile.TemporaryDirectory() as root:
        w = KVWarehouse(
            layout,
            host=HostTier(layout, 3 * layout.block_nbytes),
            disk=DiskTier(Path(root) / "disk", 4 * entry_size(layout), layout),
            shared=[SharedDirTier(Path(root) / "shared", 6 * entry_size(layout), layout)],
            write_buffer_bytes=2 * layout.block_nbytes,
        )
        try:
            for op, i in ops:
                if op == "put":
                    w.put_async(hashes[i], cache[:, :, i])
                elif op == "lookup":
                    assert len(w.lookup_prefix(hashes[i:])) <= 12 - i
                elif op == "get":
                    assert w.get(hashes[i]) in (None, block_bytes(cache, i))
                else:
                    dst = torch.zeros_like(cache)
                    n = w.load_async(hashes[i:], dst, list(range(i, 12))).wait(timeout=10)
                    assert torch.equal(dst[:, :, i : i + n], cache[:, :, i : i + n])
            assert w.flush(timeout=10)
            for name, tier in w.stats().tiers.items():
                assert tier.used_bytes <= tier.capacity_bytes, name
        finally:
            w.close()
