"""Blocks move in batches: many blocks per gather, copy and scatter, each still in its place."""

from __future__ import annotations

import threading

import pytest
import torch

from soberana.engine.kv_cache_manager import KVCacheManager
from soberana.engine.kv_offload import KVOffload
from soberana.kv.config import KVWarehouseConfig
from soberana.kv.host_tier import HostTier
from soberana.kv.layout import KVLayout
from soberana.kv.loader import BlockLoader, BlockSource, LoadHandle, payload_tensor, runs
from soberana.kv.warehouse import KVWarehouse
from soberana.kv.writer import BlockWriter
from tests.kv.helpers import block_bytes, make_cache, make_hashes, small_layout


@pytest.fixture
def warehouse(layout):
    w = KVWarehouse(layout, host=HostTier(layout, 64 * layout.block_nbytes))
    try:
        yield w
    finally:
        w.close()


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def test_a_batch_handed_over_stores_each_block_under_its_own_name(layout, warehouse):
    cache = make_cache(layout, 12, seed=3)
    hashes = make_hashes(layout, 5)
    block_ids = [11, 2, 7, 0, 5]  # evicted blocks are anywhere in the pool
    assert warehouse.put_blocks_async(hashes, cache, block_ids) == 0
    assert warehouse.flush(timeout=10)
    for h, b in zip(hashes, block_ids, strict=True):
        assert warehouse.get(h) == block_bytes(cache, b)
    assert warehouse.stats().puts == 5


def test_blocks_ram_already_holds_are_not_copied_again(layout, warehouse):
    cache = make_cache(layout, 4)
    hashes = make_hashes(layout, 4)
    assert warehouse.put_blocks_async(hashes[:2], cache, [0, 1]) == 0
    assert warehouse.flush(timeout=10)
    assert warehouse.put_blocks_async(hashes, cache, [0, 1, 2, 3]) == 0
    assert warehouse.flush(timeout=10)
    assert warehouse.stats().puts == 4


def test_a_batch_larger_than_the_free_staging_drops_the_rest_without_waiting(layout):
    w = KVWarehouse(
        layout,
        host=HostTier(layout, 16 * layout.block_nbytes),
        write_buffer_bytes=3 * layout.block_nbytes,
    )
    try:
        hashes = make_hashes(layout, 5)
        cache = make_cache(layout, 5)
        assert w.put_blocks_async(hashes, cache, [0, 1, 2, 3, 4]) == 2
        assert w.flush(timeout=10)
        assert [w.get(h) is not None for h in hashes] == [True] * 3 + [False] * 2
        stats = w.stats()
        assert (stats.puts, stats.puts_dropped) == (3, 2)
    finally:
        w.close()


def test_a_load_across_many_staging_batches_and_sources_lands_every_block_in_place(layout):
    """Host slots in a row (one copy per run), lone slots and other tiers' payloads mixed."""
    cache = make_cache(layout, 10, seed=5)
    host = HostTier(layout, 16 * layout.block_nbytes)
    hashes = make_hashes(layout, 10)
    # In RAM, stored head first as the engine hands evictions over (so 0..3 sit in
    # consecutive slots); the others come from a slower tier's bytes.
    for i in (0, 1, 2, 3, 6, 8):
        host.put(hashes[i], torch.frombuffer(bytearray(block_bytes(cache, i)), dtype=torch.uint8))
    slots = host.hold(hashes[:4])
    assert list(runs(slots, lambda a, b: b == a + 1)) == [(0, 4)]  # one copy for the four
    for slot in slots:
        host.release(slot)

    def sources(keys: list[bytes], namespace: str):
        for i, slot in enumerate(host.hold(keys)):
            if slot is None:
                yield BlockSource("disk", payload_tensor(memoryview(block_bytes(cache, i))))
            else:
                yield BlockSource("host", None, lambda s=slot: host.release(s), host.slab, slot)

    finished: list[LoadHandle] = []
    loader = BlockLoader(layout, sources, lambda h, s: finished.append(h),
                         staging_bytes=3 * layout.block_nbytes)  # fmt: skip
    try:
        assert loader.batch_blocks == 3
        dst = torch.zeros(layout.num_layers, 2, 20, *layout.block_shape[2:])
        block_ids = [19, 4, 5, 6, 0, 11, 12, 3, 17, 8]
        handle = loader.submit(hashes, dst, block_ids)
        assert handle.wait(timeout=10) == 10
        for i, b in enumerate(block_ids):
            assert torch.equal(dst[:, :, b], cache[:, :, i]), i
        untouched = sorted(set(range(20)) - set(block_ids))
        assert not dst[:, :, untouched].any()
        assert handle.tiers.count("host") == 6 and finished == [handle]
        assert host.usage().entries == 6 and not host._readers  # every slot released
    finally:
        loader.close()


@pytest.mark.parametrize(
    "dtype, head_dim",
    [("bfloat16", 8), ("float16", 3), ("float8_e4m3fn", 5), ("float32", 1)],
)
def test_blocks_of_any_cache_dtype_round_trip_byte_for_byte(dtype, head_dim):
    layout = small_layout(dtype=dtype, head_dim=head_dim)
    cache = make_cache(layout, 6, seed=7)
    w = KVWarehouse(layout, host=HostTier(layout, 8 * layout.block_nbytes))
    try:
        hashes = make_hashes(layout, 3)
        assert w.put_blocks_async(hashes, cache, [4, 1, 5]) == 0
        assert w.flush(timeout=10)
        dst = torch.zeros_like(cache)
        assert w.load_async(hashes, dst, [0, 2, 3]).wait(timeout=10) == 3
        for src, got in ((4, 0), (1, 2), (5, 3)):
            assert same_bytes(dst[:, :, got], cache[:, :, src])
    finally:
        w.close()


def test_a_cache_that_is_not_the_engines_contiguous_tensor_is_refused(layout, warehouse):
    h = make_hashes(layout, 1)
    strided = make_cache(layout, 4).transpose(0, 1).contiguous().transpose(0, 1)
    with pytest.raises(ValueError, match="contiguous"):
        warehouse.put_blocks_async(h, strided, [0])
    with pytest.raises(ValueError, match="contiguous"):
        warehouse.load_async(h, strided, [0])


def test_evictions_of_one_step_go_out_together_under_the_name_their_contents_had(
    layout: KVLayout, warehouse
):
    cache = make_cache(layout, 8, seed=9)
    kv = KVCacheManager(8, layout.block_size, True, b"\0" * 32)
    offload = KVOffload(warehouse, kv, cache, write_through=False)
    first, second, third = make_hashes(layout, 3)
    kv.pool.on_evict(first, 3)
    kv.pool.on_evict(second, 5)
    kv.pool.on_evict(third, 3)  # block 3 reused and evicted again before anything ran
    assert warehouse.stats().puts == 0  # nothing is copied until the step is launched
    offload.flush_evictions()
    assert warehouse.flush(timeout=10)
    assert warehouse.get(first) == block_bytes(cache, 3)
    assert warehouse.get(second) == block_bytes(cache, 5)
    assert warehouse.get(third) is None
    assert offload.evicted == []


def test_when_staging_is_short_the_tails_of_evicted_sequences_are_dropped_not_heads(
    layout: KVLayout,
):
    """A block is only reusable after its whole prefix: keeping a tail without its head
    would waste the slot."""
    w = KVWarehouse(layout, host=HostTier(layout, 16 * layout.block_nbytes),
                    write_buffer_bytes=3 * layout.block_nbytes)  # fmt: skip
    try:
        cache = make_cache(layout, 8, seed=3)
        kv = KVCacheManager(8, layout.block_size, True, b"\0" * 32)
        offload = KVOffload(w, kv, cache, write_through=False)
        chain = make_hashes(layout, 5)  # one sequence's blocks 0..4, in blocks 0..4
        for i in reversed(range(5)):  # the pool evicts a sequence tail first
            kv.pool.on_evict(chain[i], i)
        offload.flush_evictions()
        assert w.flush(timeout=10)
        assert w.lookup_prefix(chain) == ["host"] * 3
        assert w.stats().puts_dropped == 2
    finally:
        w.close()


def test_the_default_write_staging_holds_two_thousand_big_blocks_or_256_mb():
    config = KVWarehouseConfig(offload_gb=1.0)
    assert config.write_buffer_bytes(2 << 20) == 2048 * (2 << 20)  # Llama-3.1-8B: 2 MB blocks
    assert config.write_buffer_bytes(1024) == 256 << 20
    assert KVWarehouseConfig(write_buffer_mb=64).write_buffer_bytes(2 << 20) == 64 << 20


def test_the_writer_stores_many_blocks_per_call(layout):
    """Each call the writer's thread makes gives the GIL away and must win it back from the
    engine's busy thread: stores go in batches, not one call per block."""
    calls: list[int] = []
    gate = threading.Event()

    def store(keys, payloads, sources, namespaces):
        gate.wait(10)  # hold the first call until the whole hand-over is queued
        calls.append(len(keys))

    writer = BlockWriter(layout, store, 64 * layout.block_nbytes, pin_memory=False)
    try:
        cache = make_cache(layout, 40)
        assert writer.submit_blocks(make_hashes(layout, 40), cache, list(range(40))) == 40
        gate.set()
        assert writer.flush(timeout=10)
        assert sum(calls) == 40 and len(calls) <= 2
    finally:
        writer.close()
