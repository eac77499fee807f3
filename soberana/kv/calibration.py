"""Load or recompute: each tier's measured load rate against the engine's prefill rate."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from soberana.kv.codec import CheckedCodec, EntryCodec, EntryRejected
from soberana.kv.host_tier import HostTier
from soberana.kv.layout import KVLayout
from soberana.kv.loader import payload_tensor
from soberana.kv.tier import EntryStore

logger = logging.getLogger(__name__)

# Returns one block's payload ([block_nbytes] uint8, CPU) and a callback for when the copy
# out of it has landed; None when the probe could not be read.
ProbeRead = Callable[[], "tuple[torch.Tensor, Callable[[], None]] | None"]


@dataclass
class LoadDecision:
    """Which tiers are worth loading from, and the numbers that decided it (tokens/s)."""

    prefill_tokens_per_s: float
    load_tokens_per_s: dict[str, float]
    load_tiers: list[str]


def time_block_loads(
    layout: KVLayout, read: ProbeRead, device: torch.device | str, reps: int = 8
) -> float:
    """Tokens/s of reading a block and copying it into a cache block on `device`, the way
    the loader does: `reps` reads and asynchronous copies, then one synchronization."""
    device = torch.device(device)
    dst = torch.empty(layout.block_shape, dtype=layout.torch_dtype, device=device)
    first = read()  # warm-up: connections, page cache, lazy CUDA context
    if first is None:
        return 0.0
    first[1]()
    releases = []
    start = time.perf_counter()
    try:
        for _ in range(reps):
            got = read()
            if got is None:
                return 0.0
            payload, release = got
            releases.append(release)
            dst.copy_(payload.view(layout.torch_dtype).view(layout.block_shape), non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
    finally:
        for release in releases:
            release()
    return reps * layout.block_size / max(elapsed, 1e-9)


def measure_load_rates(
    layout: KVLayout,
    host: HostTier | None,
    stores: list[EntryStore],
    device: torch.device | str,
    reps: int = 8,
    codecs: dict[str, EntryCodec] | None = None,
) -> dict[str, float]:
    """Each tier's load rate in tokens/s, from a probe block written there (in the store's
    codec: sealed entries cost their check or decryption) and removed after; 0 for a tier
    the probe fails on (unreachable, full, read-only: it is not loaded from)."""
    probe = torch.randint(0, 256, (layout.block_nbytes,), dtype=torch.uint8)
    rates: dict[str, float] = {}
    if host is not None:
        rates[host.name] = _host_rate(layout, host, probe, device, reps)
    for store in stores:
        try:
            codec = (codecs or {}).get(store.name) or CheckedCodec(layout)
            rates[store.name] = _store_rate(layout, store, codec, probe, device, reps)
        except Exception as e:  # an unusable tier is a measurement, not a start-up failure
            logger.warning("kv %s: the load probe failed (%r); not loading from it", store.name, e)
            rates[store.name] = 0.0
    return rates


def _host_rate(
    layout: KVLayout, host: HostTier, probe: torch.Tensor, device: torch.device | str, reps: int
) -> float:
    key = os.urandom(32)
    host.put(key, probe)

    def read() -> tuple[torch.Tensor, Callable[[], None]] | None:
        held = host.acquire(key)
        return None if held is None else (held[1], partial(host.release, held[0]))

    try:
        return time_block_loads(layout, read, device, reps)
    finally:
        host.discard(key)


def _store_rate(
    layout: KVLayout,
    store: EntryStore,
    codec: EntryCodec,
    probe: torch.Tensor,
    device: torch.device | str,
    reps: int,
) -> float:
    key = os.urandom(32)
    store.put(key, codec.encode(key, memoryview(probe.numpy())))

    def read() -> tuple[torch.Tensor, Callable[[], None]] | None:
        entry = store.get(key)
        if entry is None:
            return None
        try:
            return payload_tensor(memoryview(codec.decode(key, entry))), _nothing
        except EntryRejected:
            return None

    try:
        return time_block_loads(layout, read, device, reps)
    finally:
        store.discard(key)


def _nothing() -> None:
    """Release callback for payloads nobody else holds."""


def decide(prefill_tokens_per_s: float, load_tokens_per_s: dict[str, float]) -> LoadDecision:
    """Load from a tier only where that beats recomputing the same tokens.

    Equal rates favour loading: a load runs beside other requests' steps, a recompute takes
    the accelerator from them.
    """
    if prefill_tokens_per_s <= 0:
        raise ValueError(f"prefill_tokens_per_s must be > 0; got {prefill_tokens_per_s}")
    tiers = [t for t, rate in load_tokens_per_s.items() if rate >= prefill_tokens_per_s]
    return LoadDecision(prefill_tokens_per_s, dict(load_tokens_per_s), tiers)
