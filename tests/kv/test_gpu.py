"""On a CUDA device: blocks leave and enter the GPU cache asynchronously, yet in stream order."""

from __future__ import annotations

import pytest
import torch

from soberana.kv.disk_tier import DiskTier
from soberana.kv.entry import entry_size
from soberana.kv.host_tier import HostTier
from soberana.kv.layout import KVLayout
from soberana.kv.warehouse import KVWarehouse
from tests.kv.helpers import make_hashes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SPIN_CYCLES = 200_000_000  # ~0.1 s of GPU time: keeps the stream busy ahead of our copies


@pytest.fixture
def gpu_cache():
    """A Llama-3.1-8B-shaped cache (32 layers, 8 KV heads, dim 128, bf16), 64 blocks."""
    cache = torch.randn(32, 2, 64, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    return cache, KVLayout.from_kv_cache(cache, "llama-3.1-8b-shape")


def test_host_memory_is_pinned(gpu_cache):
    _, layout = gpu_cache
    tier = HostTier(layout, 4 * layout.block_nbytes)
    assert tier.pinned and tier._slab.is_pinned()


def test_put_async_snapshots_a_block_before_later_kernels_overwrite_it(gpu_cache):
    cache, layout = gpu_cache
    warehouse = KVWarehouse(layout, host=HostTier(layout, 16 * layout.block_nbytes))
    try:
        hashes = make_hashes(layout, 8)
        expected = [cache[:, :, i].cpu() for i in range(8)]
        torch.cuda._sleep(SPIN_CYCLES)  # the engine's stream is busy with earlier work
        for i, h in enumerate(hashes):
            assert warehouse.put_async(h, cache[:, :, i])  # returns before the copy is done
        cache[:, :, :8].zero_()  # the next kernel reuses the evicted blocks
        assert warehouse.flush(timeout=30)
        for i, h in enumerate(hashes):
            got = torch.frombuffer(bytearray(warehouse.get(h)), dtype=torch.bfloat16)
            assert torch.equal(got.view(layout.block_shape), expected[i])
    finally:
        warehouse.close()


def test_a_load_lands_after_work_queued_before_it_and_before_done(gpu_cache, tmp_path):
    cache, layout = gpu_cache
    warehouse = KVWarehouse(
        layout,
        host=HostTier(layout, 4 * layout.block_nbytes),
        disk=DiskTier(tmp_path, 64 * entry_size(layout), layout),
    )
    try:
        hashes = make_hashes(layout, 8)
        warehouse.lookup_prefix(hashes)
        warehouse.lookup_prefix(hashes)  # asked for twice: RAM spills them to disk
        source = cache[:, :, :8].clone()
        for i, h in enumerate(hashes):
            warehouse.put_async(h, cache[:, :, i])
        assert warehouse.flush(timeout=30)
        assert warehouse.lookup_prefix(hashes) == ["disk"] * 4 + ["host"] * 4
        dst_ids = list(range(32, 40))  # the engine gave the request blocks 32..39
        torch.cuda._sleep(SPIN_CYCLES)
        cache[:, :, 32:40].zero_()  # queued before the load: must not wipe it afterwards
        handle = warehouse.load_async(hashes, cache, dst_ids)
        assert handle.wait(timeout=30) == 8
        torch.cuda.synchronize()
        assert torch.equal(cache[:, :, dst_ids], source)
    finally:
        warehouse.close()


def test_calibration_measures_loads_into_the_gpu(gpu_cache, tmp_path):
    _, layout = gpu_cache
    warehouse = KVWarehouse(
        layout,
        host=HostTier(layout, 4 * layout.block_nbytes),
        disk=DiskTier(tmp_path, 16 * entry_size(layout), layout),
    )
    try:
        decision = warehouse.calibrate(prefill_tokens_per_s=1.0, device="cuda")
        print("load tokens/s per tier:", decision.load_tokens_per_s)
        assert decision.load_tiers == ["host", "disk"]
        assert decision.load_tokens_per_s["host"] > decision.load_tokens_per_s["disk"] > 0
    finally:
        warehouse.close()


def test_a_batch_of_evictions_is_snapshot_before_later_kernels_and_loads_back_in_place(
    gpu_cache,
):
    """The engine's path: evicted blocks leave in one batch, a returning prefix of more blocks
    than one staging batch comes back into scattered blocks."""
    cache, layout = gpu_cache
    warehouse = KVWarehouse(layout, host=HostTier(layout, 96 * layout.block_nbytes))
    try:
        n = warehouse._loader.batch_blocks + 5  # crosses a staging batch
        big = torch.randn(32, 2, 2 * n, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
        hashes = make_hashes(layout, n)
        evicted = list(range(n - 1, -1, -1))  # the pool evicts a sequence tail first
        expected = big[:, :, :n].clone()
        torch.cuda._sleep(SPIN_CYCLES)
        assert warehouse.put_blocks_async(hashes[::-1], big, evicted) == 0
        big[:, :, :n].zero_()  # the step that reuses the evicted blocks
        assert warehouse.flush(timeout=30)
        dst = list(range(2 * n - 1, n - 1, -1))
        assert warehouse.load_async(hashes, big, dst).wait(timeout=30) == n
        torch.cuda.synchronize()
        assert torch.equal(big[:, :, dst], expected)
    finally:
        warehouse.close()


def test_handing_over_a_batch_never_synchronises_the_engine_stream(gpu_cache):
    """It runs inside the engine's step, before the launch (async scheduling): a sync would
    stall the GPU."""
    cache, layout = gpu_cache
    warehouse = KVWarehouse(layout, host=HostTier(layout, 16 * layout.block_nbytes))
    try:
        hashes = make_hashes(layout, 8)
        # The debug mode is global: the writer thread waits (on this lock) until it is off.
        with warehouse._writer._cond:
            torch.cuda.set_sync_debug_mode("error")
            try:
                assert warehouse.put_blocks_async(hashes, cache, list(range(8))) == 0
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert warehouse.flush(timeout=30)
        assert warehouse.load_async(hashes, cache, list(range(16, 24))).wait(timeout=30) == 8
        torch.cuda.synchronize()
        assert torch.equal(cache[:, :, 16:24], cache[:, :, :8])
    finally:
        warehouse.close()


def test_copies_off_the_gpu_do_not_hold_back_the_engine_stream(gpu_cache):
    """Evictions are gathered on the engine's stream (a device copy) but cross the bus on the
    writer's own stream: the engine's next kernels do not queue behind them."""
    cache, layout = gpu_cache
    warehouse = KVWarehouse(layout, host=HostTier(layout, 16 * layout.block_nbytes))
    try:
        copy_stream = warehouse._writer._copy_stream(cache.device)
        with torch.cuda.stream(copy_stream):
            torch.cuda._sleep(5 * SPIN_CYCLES)  # the bus is "busy" for ~0.5 s
        expected = cache[:, :, :8].clone()
        assert warehouse.put_blocks_async(make_hashes(layout, 8), cache, list(range(8))) == 0
        cache[:, :, :8].zero_()  # the engine's next step overwrites the evicted blocks
        torch.cuda.current_stream().synchronize()
        assert not copy_stream.query()  # the engine stream ran ahead of the copies
        assert warehouse.flush(timeout=30)
        assert warehouse.load_async(make_hashes(layout, 8), cache, list(range(8, 16))).wait(30) == 8
        torch.cuda.synchronize()
        assert torch.equal(cache[:, :, 8:16], expected)
    finally:
        warehouse.close()
