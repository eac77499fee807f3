"""The warehouse's counters as Prometheus metrics, rendered from a WarehouseStats snapshot."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from soberana.kv.stats import TierStats, WarehouseStats

PREFIX = "soberana:kv_"

# (metric suffix, WarehouseStats field, help)
_COUNTERS = (
    ("lookups", "lookups", "Prefix lookups (one per admitted request)."),
    ("lookup_blocks", "lookup_blocks", "Blocks asked about by prefix lookups."),
    ("lookup_hit_blocks", "lookup_hit_blocks", "Blocks found in some tier by prefix lookups."),
    ("loads", "loads", "Prefix loads finished."),
    ("blocks_loaded", "blocks_loaded", "Blocks copied into the engine's KV cache."),
    ("prefill_tokens_saved", "prefill_tokens_saved", "Prompt tokens loaded, not recomputed."),
    ("puts", "puts", "Blocks handed to the warehouse and accepted."),
    ("puts_dropped", "puts_dropped", "Blocks dropped because the write buffer was full."),
    ("admission_rejected", "admission_rejected", "Blocks kept off disk (asked for once)."),
)
# (metric suffix, TierStats field, help), each labelled by tier
_TIER_COUNTERS = (
    ("hits", "hits", "Blocks read from the tier."),
    ("misses", "misses", "Reads the tier could not serve (absent, refused or unreachable)."),
    ("tier_lookup_hits", "lookup_hits", "Blocks that prefix lookups found in the tier."),
    ("rejected_entries", "rejected", "Entries refused: corrupt, truncated, foreign layout."),
    ("errors", "errors", "I/O or connection failures of the tier."),
    ("read_bytes", "bytes_read", "Payload bytes read from the tier towards the engine."),
    ("written_bytes", "bytes_written", "Bytes written into the tier."),
    ("written_blocks", "blocks_written", "Blocks written into the tier."),
)
_TIER_GAUGES = (
    ("tier_used_bytes", "used_bytes", "Bytes the tier holds (Redis: the whole server)."),
    ("tier_capacity_bytes", "capacity_bytes", "Capacity of the tier in bytes."),
    ("tier_entries", "entries", "Blocks the tier holds."),
)


class KVWarehouseCollector:
    """A Prometheus collector over the latest stats; `get_stats` returns None until the
    engine has reported any. Register it with the server's registry."""

    def __init__(
        self,
        get_stats: Callable[[], WarehouseStats | None],
        labels: dict[str, str] | None = None,
    ) -> None:
        self._get_stats = get_stats
        self._labels = dict(labels or {})

    def collect(self) -> Iterator[Metric]:
        stats = self._get_stats()
        if stats is None:
            return
        names, values = list(self._labels), list(self._labels.values())
        for suffix, field, doc in _COUNTERS:
            metric = CounterMetricFamily(PREFIX + suffix, doc, labels=names)
            metric.add_metric(values, getattr(stats, field))
            yield metric
        for suffix, field, doc in _TIER_COUNTERS:
            yield _per_tier(CounterMetricFamily, suffix, doc, names, values, stats.tiers, field)
        for suffix, field, doc in _TIER_GAUGES:
            yield _per_tier(GaugeMetricFamily, suffix, doc, names, values, stats.tiers, field)
        loading = GaugeMetricFamily(
            PREFIX + "tier_loading",
            "1 if blocks are loaded from the tier, 0 if recomputed.",
            labels=[*names, "tier"],
        )
        for tier in stats.tiers:
            loading.add_metric([*values, tier], float(tier in stats.load_tiers))
        yield loading
        latency = HistogramMetricFamily(
            PREFIX + "load_latency_seconds",
            "Time to load one request's cached prefix into the KV cache.",
            labels=names,
        )
        cumulative, buckets = 0, []
        for bound, count in zip(
            (*stats.load_latency_buckets, float("inf")), stats.load_latency_counts, strict=True
        ):
            cumulative += count
            buckets.append((_bucket_label(bound), cumulative))
        latency.add_metric(values, buckets, stats.load_latency_sum)
        yield latency


def _per_tier(
    family: type[CounterMetricFamily] | type[GaugeMetricFamily],
    suffix: str,
    doc: str,
    names: list[str],
    values: list[str],
    tiers: dict[str, TierStats],
    field: str,
) -> Metric:
    metric = family(PREFIX + suffix, doc, labels=[*names, "tier"])
    for tier, s in tiers.items():
        value = getattr(s, field)
        if value is not None:
            metric.add_metric([*values, tier], value)
    return metric


def _bucket_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))
