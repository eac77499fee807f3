"""The warehouse's counters: plain data that crosses the engine-core process boundary."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Seconds; a load is one request's prefix, from load_async() to its blocks being in place.
LOAD_LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


@dataclass
class TierStats:
    """One tier's counters (cumulative) and its usage (a gauge)."""

    hits: int = 0  # blocks read from this tier
    misses: int = 0  # reads this tier could not serve: absent, unsound or unreachable
    lookup_hits: int = 0  # leading blocks that lookup_prefix found in this tier
    rejected: int = 0  # entries refused by the check: corrupt, truncated, foreign
    errors: int = 0  # I/O or connection failures
    bytes_read: int = 0  # payload bytes served towards the engine
    bytes_written: int = 0  # bytes stored into this tier
    blocks_written: int = 0
    used_bytes: int = 0
    capacity_bytes: int = 0
    entries: int | None = None


@dataclass
class WarehouseStats:
    """Everything /metrics shows about the warehouse; counters are cumulative since start."""

    lookups: int = 0  # lookup_prefix calls
    lookup_blocks: int = 0  # block hashes asked about
    lookup_hit_blocks: int = 0  # of those, in the returned prefixes
    loads: int = 0  # load_async calls finished
    blocks_loaded: int = 0  # blocks copied into the engine's cache
    prefill_tokens_saved: int = 0  # blocks_loaded * block_size
    puts: int = 0  # blocks accepted by put_async
    puts_dropped: int = 0  # blocks refused because the write queue was full
    admission_rejected: int = 0  # blocks kept off the disk tier (seen once)
    load_latency_buckets: tuple[float, ...] = LOAD_LATENCY_BUCKETS_S
    # Per bucket (not cumulative), one more than the buckets for +Inf.
    load_latency_counts: list[int] = field(
        default_factory=lambda: [0] * (len(LOAD_LATENCY_BUCKETS_S) + 1)
    )
    load_latency_sum: float = 0.0
    tiers: dict[str, TierStats] = field(default_factory=dict)
    load_tiers: list[str] = field(default_factory=list)  # tiers calibration chose to load from

    def observe_load_latency(self, seconds: float) -> None:
        """Add one load's duration to the histogram."""
        self.load_latency_counts[bisect.bisect_left(self.load_latency_buckets, seconds)] += 1
        self.load_latency_sum += seconds
