"""The warehouse's numbers in Prometheus exposition: hits and misses per tier, bytes, the load
latency histogram, prefill tokens saved, tier usage."""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from soberana.kv.host_tier import HostTier
from soberana.kv.metrics import KVWarehouseCollector
from soberana.kv.shared_dir_tier import SharedDirTier
from soberana.kv.warehouse import KVWarehouse
from tests.kv.helpers import make_cache, make_hashes


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    """Every sample of the text exposition, by (name, sorted labels)."""
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_report_what_the_warehouse_did(layout, tmp_path):
    host = HostTier(layout, 2 * layout.block_nbytes)
    warehouse = KVWarehouse(layout, host=host, shared=[SharedDirTier(tmp_path, 1 << 20, layout)])
    registry = CollectorRegistry()
    registry.register(KVWarehouseCollector(warehouse.stats, {"model_name": "m", "engine": "0"}))
    try:
        hashes = make_hashes(layout, 4)
        cache = make_cache(layout, 4)
        for i, h in enumerate(hashes):
            warehouse.put_async(h, cache[:, :, i])
        assert warehouse.flush(timeout=10)
        assert warehouse.lookup_prefix(hashes + make_hashes(layout, 1, seed=9)) == (
            ["shared_dir"] * 2 + ["host"] * 2
        )
        dst = torch.zeros(layout.num_layers, 2, 4, *layout.block_shape[2:])
        assert warehouse.load_async(hashes, dst, [0, 1, 2, 3]).wait(timeout=10) == 4
        m = scrape(registry)
    finally:
        warehouse.close()

    base = (("engine", "0"), ("model_name", "m"))

    def tier(name: str) -> tuple:
        return tuple(sorted((*base, ("tier", name))))

    assert m[("soberana:kv_lookups_total", base)] == 1
    assert m[("soberana:kv_lookup_blocks_total", base)] == 5
    assert m[("soberana:kv_lookup_hit_blocks_total", base)] == 4
    assert m[("soberana:kv_hits_total", tier("host"))] == 2
    assert m[("soberana:kv_misses_total", tier("host"))] == 2
    assert m[("soberana:kv_hits_total", tier("shared_dir"))] == 2
    assert m[("soberana:kv_read_bytes_total", tier("shared_dir"))] == 2 * layout.block_nbytes
    assert m[("soberana:kv_written_blocks_total", tier("shared_dir"))] == 4
    assert m[("soberana:kv_blocks_loaded_total", base)] == 4
    assert m[("soberana:kv_prefill_tokens_saved_total", base)] == 4 * layout.block_size
    assert m[("soberana:kv_puts_total", base)] == 4
    assert m[("soberana:kv_load_latency_seconds_count", base)] == 1
    assert (
        m[("soberana:kv_load_latency_seconds_bucket", tuple(sorted((*base, ("le", "+Inf")))))] == 1
    )
    assert 0 < m[("soberana:kv_load_latency_seconds_sum", base)] < 10
    assert m[("soberana:kv_tier_used_bytes", tier("host"))] == 2 * layout.block_nbytes
    assert m[("soberana:kv_tier_capacity_bytes", tier("host"))] == 2 * layout.block_nbytes
    assert m[("soberana:kv_tier_entries", tier("shared_dir"))] == 4
    assert m[("soberana:kv_tier_loading", tier("host"))] == 1


def test_nothing_is_exposed_before_the_engine_reports():
    registry = CollectorRegistry()
    registry.register(KVWarehouseCollector(lambda: None))
    assert "soberana:kv" not in generate_latest(registry).decode()
