"""The KV warehouse: one content-addressed store over the tiers below the engine's block pool."""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import TypeVar

import redis
import torch

from soberana.kv.admission import SecondSightingAdmission
from soberana.kv.calibration import LoadDecision, decide, measure_load_rates
from soberana.kv.config import GB, KVWarehouseConfig
from soberana.kv.disk_tier import DiskTier
from soberana.kv.entry import HEADER_SIZE, encode_entry, entry_problem
from soberana.kv.host_tier import HostTier
from soberana.kv.layout import KVLayout
from soberana.kv.loader import BlockLoader, BlockSource, LoadHandle, payload_tensor
from soberana.kv.redis_tier import RedisTier
from soberana.kv.shared_dir_tier import SharedDirTier
from soberana.kv.stats import TierStats, WarehouseStats
from soberana.kv.tier import EntryStore
from soberana.kv.writer import BlockWriter

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Errors that mean "the store is not there": skip it for a while instead of waiting on every
# lookup for a timeout.
_UNREACHABLE = (ConnectionError, TimeoutError, redis.ConnectionError, redis.TimeoutError)
ERROR_LOG_INTERVAL_S = 10.0


class KVWarehouse:
    """Host RAM, then local disk, then the shared stores, all named by the engine's block hash.

    Thread-safe: the engine thread calls `lookup_prefix`, `put_async`, `load_async`; a writer
    thread stores blocks and a loader thread loads them. No call raises a tier's failure into
    the engine: an unreachable or failing tier is a miss, counted in `stats()`.
    """

    def __init__(
        self,
        layout: KVLayout,
        *,
        host: HostTier | None = None,
        disk: DiskTier | None = None,
        shared: Sequence[EntryStore] = (),
        write_buffer_bytes: int = 256 << 20,
        admission: SecondSightingAdmission | None = None,
        pin_memory: bool | None = None,
        cooldown_s: float = 5.0,
    ) -> None:
        self.layout = layout
        self.host = host
        self.disk = disk
        self.shared = list(shared)
        self.stores: list[EntryStore] = ([disk] if disk is not None else []) + self.shared
        names = self.tier_names
        if not names:
            raise ValueError("a KV warehouse needs at least one tier")
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must differ; got {names}")
        if disk is not None and admission is None:
            admission = SecondSightingAdmission(default_ghost_capacity(disk))
        self.admission = admission
        self.load_tiers: set[str] = set(names)  # narrowed by calibrate()
        self.decision: LoadDecision | None = None
        self.cooldown_s = cooldown_s
        self._stats = WarehouseStats(tiers={n: TierStats() for n in names})
        self._stats_lock = threading.Lock()
        self._down_until: dict[str, float] = {}
        self._last_error_log: dict[str, float] = {}
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._writer = BlockWriter(layout, self._store, write_buffer_bytes, pin)
        self._loader = BlockLoader(layout, self._sources, self._load_finished)

    @property
    def tier_names(self) -> list[str]:
        """Tiers from fastest to slowest: the order lookups and reads try them in."""
        return ([self.host.name] if self.host is not None else []) + [s.name for s in self.stores]

    # ---- read path -------------------------------------------------------------------------

    def lookup_prefix(self, block_hashes: list[bytes]) -> list[str]:
        """The tier holding each of the longest run of leading `block_hashes` the warehouse
        can load (fastest tier first); its length is the number of blocks to load.

        Call once per request admission with the hashes after the GPU pool's own prefix hit:
        each call counts as a sighting for disk admission. A hit is a hint, not a promise:
        a block can be evicted before it is loaded, so the load may come up short.
        """
        if self.admission is not None:
            self.admission.record_sightings(block_hashes)
        where: list[str | None] = [None] * len(block_hashes)
        all_tiers: list[HostTier | EntryStore] = ([self.host] if self.host else []) + self.stores
        tiers = [t for t in all_tiers if t.name in self.load_tiers]
        for n, tier in enumerate(tiers):
            pending = [i for i, w in enumerate(where) if w is None]
            if n < len(tiers) - 1:
                self._ask(tier, block_hashes, pending, where)
                continue
            # No tier below can fill a gap the last one leaves: ask it in growing chunks and
            # stop at the first miss, so a new prompt costs one small query, not one a block.
            start, chunk = 0, 16
            while start < len(pending):
                if not self._ask(tier, block_hashes, pending[start : start + chunk], where):
                    break
                start, chunk = start + chunk, 2 * chunk
        prefix: list[str] = []
        for w in where:
            if w is None:
                break
            prefix.append(w)
        with self._stats_lock:
            self._stats.lookups += 1
            self._stats.lookup_blocks += len(block_hashes)
            self._stats.lookup_hit_blocks += len(prefix)
            for name in prefix:
                self._stats.tiers[name].lookup_hits += 1
        return prefix

    def _ask(
        self,
        tier: HostTier | EntryStore,
        block_hashes: list[bytes],
        indices: list[int],
        where: list[str | None],
    ) -> bool:
        """Mark the blocks `tier` holds among `indices`; True when it holds all of them."""
        asked = [block_hashes[i] for i in indices]
        if tier is self.host:  # blocks about to be loaded must not be evicted first
            query = partial(tier.contains_many, touch=True)
        else:
            query = tier.contains_many
        found = self._guarded(tier, query, asked, default=None) or [False] * len(asked)
        for i, hit in zip(indices, found, strict=True):
            if hit:
                where[i] = tier.name
        return all(found)

    def load_async(
        self, block_hashes: list[bytes], kv_cache: torch.Tensor, block_ids: list[int]
    ) -> LoadHandle:
        """Copy `block_hashes[i]` into `kv_cache[:, :, block_ids[i]]` in the background.

        Stops at the first block it cannot find or that fails its check; `handle.num_loaded`
        leading blocks are valid once `handle.done()`.
        """
        # Blocks all in host RAM are issued from the caller's (the engine's) thread.
        inline = kv_cache.is_cuda and self.host is not None and all(
            self.host.contains_many(block_hashes))  # fmt: skip
        return self._loader.submit(block_hashes, kv_cache, block_ids, inline=inline)

    def get(self, block_hash: bytes) -> bytes | None:
        """One block's payload (`kv_cache[:, :, b]` as bytes) from the fastest tier holding
        a sound copy, or None. A block found below host RAM is promoted upwards."""
        source = self._read(block_hash)
        if source is None:
            return None
        try:
            return source.payload.numpy().tobytes()
        finally:
            if source.release is not None:
                source.release()

    def _read(self, key: bytes) -> BlockSource | None:
        """The fastest sound copy of one block; one found below RAM is promoted into RAM."""
        host = self.host
        if host is not None and host.name in self.load_tiers:
            held = host.acquire(key)
            if held is not None:
                slot, payload = held
                self._count(host.name, hits=1, bytes_read=self.layout.block_nbytes)
                return BlockSource(host.name, payload, partial(host.release, slot))
            self._count(host.name, misses=1)
        found = self._read_stores(key)
        if found is None:
            return None
        store, payload = found
        self._writer.submit(key, payload, source=store.name)  # dropped when the buffer is busy
        return BlockSource(store.name, payload_tensor(payload))

    def _sources(self, keys: list[bytes]) -> Iterator[BlockSource]:
        """The loader's reads: a source per leading block found, in order.

        Blocks in RAM are held from the start, so that blocks the engine evicts meanwhile
        cannot push the rest of this prefix out of RAM while the first part is read from
        slower tiers. Nothing is promoted: loaded blocks live in the GPU pool, which hands
        them back to RAM when it evicts them.
        """
        host = self.host
        held: list[int | None] = [None] * len(keys)
        if host is not None and host.name in self.load_tiers:
            held = host.hold(keys)
        try:
            for i, key in enumerate(keys):
                slot, held[i] = held[i], None
                if slot is not None:
                    self._count(host.name, hits=1, bytes_read=self.layout.block_nbytes)
                    yield BlockSource(host.name, None, partial(host.release, slot), host.slab, slot)
                    continue
                if host is not None and host.name in self.load_tiers:
                    self._count(host.name, misses=1)
                found = self._read_stores(key)
                if found is None:
                    return
                yield BlockSource(found[0].name, payload_tensor(found[1]))
        finally:
            for slot in held:
                if slot is not None:
                    host.release(slot)

    def _read_stores(self, key: bytes) -> tuple[EntryStore, memoryview] | None:
        for store in self.stores:
            if store.name in self.load_tiers:
                payload = self._read_store(store, key)
                if payload is not None:
                    return store, payload
        return None

    def _read_store(self, store: EntryStore, key: bytes) -> memoryview | None:
        entry = self._guarded(store, store.get, key, default=None)
        if entry is None:
            self._count(store.name, misses=1)
            return None
        problem = entry_problem(self.layout, key, entry)
        if problem is not None:
            logger.warning(
                "kv %s: entry %s refused (%s); treating it as a miss",
                store.name,
                key.hex()[:16],
                problem,
            )
            self._count(store.name, misses=1, rejected=1)
            self._guarded(store, store.discard, key, default=None)
            return None
        self._count(store.name, hits=1, bytes_read=self.layout.block_nbytes)
        return memoryview(entry)[HEADER_SIZE:]

    def _load_finished(self, handle: LoadHandle, seconds: float) -> None:
        with self._stats_lock:
            self._stats.loads += 1
            self._stats.blocks_loaded += handle.num_loaded
            self._stats.prefill_tokens_saved += handle.num_loaded * self.layout.block_size
            self._stats.observe_load_latency(seconds)

    # ---- write path ------------------------------------------------------------------------

    def put_async(self, block_hash: bytes, block: torch.Tensor | bytes | memoryview) -> bool:
        """Hand over one full block (`kv_cache[:, :, block_id]`, on any device, or its bytes).

        Never waits: the block is copied into a staging slot (on a GPU, asynchronously on the
        current stream, ahead of any later kernel that overwrites it) and stored by the
        writer thread. Returns False when the staging buffer is full and the block is dropped.
        """
        if self.host is not None and self.host.contains_many([block_hash])[0]:
            return True  # it came from the warehouse, or was handed over before
        accepted = self._writer.submit(block_hash, block)
        with self._stats_lock:
            if accepted:
                self._stats.puts += 1
            else:
                self._stats.puts_dropped += 1
        return accepted

    def put_blocks_async(
        self, block_hashes: list[bytes], kv_cache: torch.Tensor, block_ids: list[int]
    ) -> int:
        """Hand over `kv_cache[:, :, block_ids[i]]` named `block_hashes[i]`, all at once: the
        engine's evictions of one step, gathered in a few kernels and copies (`put_async`
        costs a temporary, a kernel and a copy per block). Never waits; returns how many
        blocks were dropped because the staging buffer was full."""
        if self.host is not None:  # from the warehouse, or handed over before
            fresh = [i for i, held in enumerate(self.host.contains_many(block_hashes)) if not held]
            block_hashes = [block_hashes[i] for i in fresh]
            block_ids = [block_ids[i] for i in fresh]
        if not block_hashes:
            return 0
        accepted = self._writer.submit_blocks(block_hashes, kv_cache, block_ids)
        dropped = len(block_hashes) - accepted
        with self._stats_lock:
            self._stats.puts += accepted
            self._stats.puts_dropped += dropped
        return dropped

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every block handed over so far is stored; False on timeout."""
        return self._writer.flush(timeout)

    def _store(
        self, keys: list[bytes], payloads: list[torch.Tensor], sources: list[str | None]
    ) -> None:
        """Writer thread: put a batch of blocks where they belong. A source is None for the
        engine's blocks, else the tier a promoted block was read from."""
        if self.host is not None:
            spill = self._admit_to_disk if self.disk is not None else None
            stored, spilled = self.host.put_many(keys, payloads, spill)
            for victim, victim_payload in spilled:
                self._write(self.disk, victim, encode_entry(self.layout, victim, victim_payload))
            if stored:
                self._count(self.host.name, blocks_written=stored,
                            bytes_written=stored * self.layout.block_nbytes)  # fmt: skip
        for key, payload, source in zip(keys, payloads, sources, strict=True):
            entry: bytes | None = None
            if self.host is None and self.disk is not None and source != self.disk.name:
                if self._admit_to_disk(key):
                    entry = encode_entry(self.layout, key, memoryview(payload.numpy()))
                    self._write(self.disk, key, entry)
            if source is None:
                # Shared stores take every block: their point is that another replica may
                # want it.
                for store in self.shared:
                    if not self._guarded(store, store.contains_many, [key], default=[True])[0]:
                        if entry is None:
                            entry = encode_entry(self.layout, key, memoryview(payload.numpy()))
                        self._write(store, key, entry)

    def _admit_to_disk(self, key: bytes) -> bool:
        admitted = self.admission is None or self.admission.admits(key)
        if not admitted:
            with self._stats_lock:
                self._stats.admission_rejected += 1
        return admitted

    def _write(self, store: EntryStore, key: bytes, entry: bytes) -> None:
        if self._guarded(store, store.put, key, entry, default=False):
            self._count(store.name, blocks_written=1, bytes_written=len(entry))

    # ---- load or recompute -----------------------------------------------------------------

    def calibrate(
        self, prefill_tokens_per_s: float, device: torch.device | str = "cpu", reps: int = 8
    ) -> LoadDecision:
        """Measure each tier's load rate into `device` and keep only tiers that load faster
        than the engine prefills (`prefill_tokens_per_s`, measured by the engine at start)."""
        rates = measure_load_rates(self.layout, self.host, self.stores, device, reps)
        self.decision = decide(prefill_tokens_per_s, rates)
        self.load_tiers = set(self.decision.load_tiers)
        logger.info(
            "kv warehouse: prefill %.0f tokens/s; load tokens/s %s; loading from %s",
            prefill_tokens_per_s,
            {k: round(v) for k, v in rates.items()},
            self.decision.load_tiers or "no tier (recompute is faster)",
        )
        return self.decision

    # ---- bookkeeping -----------------------------------------------------------------------

    def stats(self) -> WarehouseStats:
        """A snapshot of every counter, with each tier's current usage."""
        tiers: list[HostTier | EntryStore] = ([self.host] if self.host else []) + self.stores
        usage = {t.name: self._guarded(t, t.usage, default=None) for t in tiers}
        with self._stats_lock:
            for name, u in usage.items():
                if u is not None:
                    s = self._stats.tiers[name]
                    s.used_bytes, s.capacity_bytes, s.entries = (
                        u.used_bytes,
                        u.capacity_bytes,
                        u.entries,
                    )
            self._stats.load_tiers = [n for n in self.tier_names if n in self.load_tiers]
            return copy.deepcopy(self._stats)

    def _count(self, tier: str, **deltas: int) -> None:
        with self._stats_lock:
            s = self._stats.tiers[tier]
            for field, delta in deltas.items():
                setattr(s, field, getattr(s, field) + delta)

    def _guarded(self, tier: HostTier | EntryStore, fn: Callable[..., T], *args, default: T) -> T:
        """Call a tier; any failure becomes `default` and a counted, rate-limited warning."""
        now = time.monotonic()
        if now < self._down_until.get(tier.name, 0.0):
            return default
        try:
            return fn(*args)
        except Exception as e:  # a tier's failure must never reach the engine
            self._count(tier.name, errors=1)
            if isinstance(e, _UNREACHABLE):
                self._down_until[tier.name] = now + self.cooldown_s
            if now - self._last_error_log.get(tier.name, float("-inf")) >= ERROR_LOG_INTERVAL_S:
                self._last_error_log[tier.name] = now
                name = getattr(getattr(fn, "func", fn), "__name__", "call")
                logger.warning("kv %s: %s failed: %r", tier.name, name, e)
            return default

    def close(self, timeout: float | None = 10.0) -> None:
        """Store what is queued (up to `timeout`), stop the threads, release the tiers."""
        self._writer.close(timeout)
        self._loader.close(timeout)
        tiers: list[HostTier | EntryStore] = ([self.host] if self.host else []) + self.stores
        for tier in tiers:
            self._guarded(tier, tier.close, default=None)


def build_warehouse(config: KVWarehouseConfig, layout: KVLayout) -> KVWarehouse | None:
    """The warehouse `config` describes for `layout`, or None when no tier is configured."""
    config.validate()
    if not config.enabled():
        return None
    host = HostTier(layout, int(config.offload_gb * GB)) if config.offload_gb else None
    disk = DiskTier(config.disk_dir, int(config.disk_gb * GB), layout) if config.disk_dir else None
    shared: list[EntryStore] = []
    if config.redis_url:
        shared.append(RedisTier(config.redis_url, layout, ttl_s=config.redis_ttl_s))
    if config.shared_dir:
        shared.append(SharedDirTier(config.shared_dir, int(config.shared_gb * GB), layout))
    return KVWarehouse(
        layout,
        host=host,
        disk=disk,
        shared=shared,
        write_buffer_bytes=config.write_buffer_bytes(layout.block_nbytes),
    )


def default_ghost_capacity(disk: DiskTier) -> int:
    """Remember twice as many hashes as the disk holds blocks, within [4096, 2**20]."""
    return min(max(2 * disk.capacity_bytes // disk.entry_size, 4096), 1 << 20)
