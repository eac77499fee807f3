"""The KV warehouse: one content-addressed store over the tiers below the engine's block pool."""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import TypeVar

import torch

from soberana.kv.admission import SecondSightingAdmission
from soberana.kv.calibration import LoadDecision, decide, measure_load_rates
from soberana.kv.codec import CheckedCodec, EntryCodec, EntryRejected, SealedCodec
from soberana.kv.disk_tier import DiskTier
from soberana.kv.host_tier import HostTier
from soberana.kv.layout import KVLayout
from soberana.kv.loader import BlockLoader, BlockSource, LoadHandle, payload_tensor
from soberana.kv.namespace import tenant_namespace, tenant_salt_of
from soberana.kv.stats import TierStats, WarehouseStats
from soberana.kv.tier import EntryStore, TierUsage
from soberana.kv.tier_guard import TierGuard
from soberana.kv.writer import BlockWriter

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The engine's thread waits this long at most for a shared store to answer a lookup. A Redis
# pipeline on a LAN answers in about a millisecond, but on a loaded host (2 cores shared by
# many processes) waking the worker thread alone took over 50 ms.
LOOKUP_TIMEOUT_S = 0.25
# Between two upkeep rounds: shared usage refreshed, failed probes retried.
UPKEEP_INTERVAL_S = 5.0
_NAMESPACE_CACHE = 4096


class KVWarehouse:
    """Host RAM, then local disk, then the shared stores, all named by the engine's block hash.

    Thread-safe: the engine thread calls `lookup_prefix`, `put_async`, `load_async`; a writer
    thread stores blocks and a loader thread loads them. No call raises a tier's failure into
    the engine: an unreachable or failing tier is a miss, counted in `stats()`. The engine's
    thread does no I/O of its own on a shared store: lookups run on the store's worker
    thread and are waited for at most `lookup_timeout_s`; an upkeep thread refreshes the
    shared stores' usage and re-probes tiers whose calibration probe failed.

    `shared_key` (>= 16 bytes) seals the shared stores' entries (`codec.py`): authenticated
    and bound to their block and tenant namespace, and with `encrypt` unreadable. Without it
    their entries are only checksummed: the caller has decided the stores are trusted.
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
        shared_key: bytes | None = None,
        encrypt: bool = False,
        lookup_timeout_s: float = LOOKUP_TIMEOUT_S,
        upkeep_interval_s: float = UPKEEP_INTERVAL_S,
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
        if encrypt and shared_key is None:
            raise ValueError("encrypting shared KV entries needs a shared key")
        self.shared_key = shared_key
        shared_codec: EntryCodec = (
            SealedCodec(layout, shared_key, encrypt) if shared_key else CheckedCodec(layout)
        )
        self.codecs: dict[str, EntryCodec] = {s.name: shared_codec for s in self.shared}
        if disk is not None:
            self.codecs[disk.name] = CheckedCodec(layout)  # one replica's own directory
        for store in self.stores:
            if store.entry_size != self.codecs[store.name].entry_size:
                raise ValueError(
                    f"tier {store.name} stores {store.entry_size}-byte entries; its codec "
                    f"writes {self.codecs[store.name].entry_size} (pass stored_entry_size)"
                )
        self.load_tiers: set[str] = set(names)  # narrowed by calibrate()
        self.decision: LoadDecision | None = None
        self.lookup_timeout_s = lookup_timeout_s
        self._stats = WarehouseStats(tiers={n: TierStats() for n in names})
        self._stats_lock = threading.Lock()
        self._guard = TierGuard(self._count_error, cooldown_s)
        self._namespaces: dict[str | None, str] = {}
        # Set by calibrate(): (prefill tokens/s, device, reps), and the tiers whose probe
        # failed (unreachable or full at the time), which upkeep probes again.
        self._calibration: tuple[float, torch.device | str, int] | None = None
        self._failed_probes: set[str] = set()
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._writer = BlockWriter(layout, self._store, write_buffer_bytes, pin)
        self._loader = BlockLoader(layout, self._sources, self._load_finished)
        self._upkeep_interval_s = upkeep_interval_s
        self._closed = threading.Event()
        self._upkeep_thread = threading.Thread(target=self._upkeep, name="kv-upkeep", daemon=True)
        self._upkeep_thread.start()

    def namespace_of(self, cache_salt: str | None) -> str:
        """The tenant namespace (`namespace.py`) of blocks hashed under `cache_salt`."""
        ns = self._namespaces.get(cache_salt)
        if ns is None:
            ns = tenant_namespace(tenant_salt_of(cache_salt), self.shared_key)
            if len(self._namespaces) >= _NAMESPACE_CACHE:
                self._namespaces.clear()
            self._namespaces[cache_salt] = ns
        return ns

    @property
    def tier_names(self) -> list[str]:
        """Tiers from fastest to slowest: the order lookups and reads try them in."""
        return ([self.host.name] if self.host is not None else []) + [s.name for s in self.stores]

    # ---- read path -------------------------------------------------------------------------

    def lookup_prefix(self, block_hashes: list[bytes], namespace: str = "") -> list[str]:
        """The tier holding each of the longest run of leading `block_hashes` the warehouse
        can load (fastest tier first); its length is the number of blocks to load.

        Call once per request admission with the hashes after the GPU pool's own prefix hit:
        each call counts as a sighting for disk admission. A hit is a hint, not a promise:
        a block can be evicted before it is loaded, so the load may come up short.
        `namespace` is the blocks' tenant namespace (`namespace_of(request.cache_salt)`).
        """
        if self.admission is not None:
            self.admission.record_sightings(block_hashes)
        where: list[str | None] = [None] * len(block_hashes)
        all_tiers: list[HostTier | EntryStore] = ([self.host] if self.host else []) + self.stores
        tiers = [t for t in all_tiers if t.name in self.load_tiers]
        for n, tier in enumerate(tiers):
            pending = [i for i, w in enumerate(where) if w is None]
            if n < len(tiers) - 1:
                self._ask(tier, block_hashes, pending, where, namespace)
                continue
            # No tier below can fill a gap the last one leaves: ask it in growing chunks and
            # stop at the first miss, so a new prompt costs one small query, not one a block.
            start, chunk = 0, 16
            while start < len(pending):
                if not self._ask(tier, block_hashes, pending[start : start + chunk], where,
                                 namespace):  # fmt: skip
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
        namespace: str,
    ) -> bool:
        """Mark the blocks `tier` holds among `indices`; True when it holds all of them."""
        asked = [block_hashes[i] for i in indices]
        if tier is self.host:  # blocks about to be loaded must not be evicted first
            found = self._guarded(tier, partial(tier.contains_many, touch=True), asked,
                                  default=None)  # fmt: skip
        elif tier is self.disk:  # an in-memory index
            found = self._guarded(tier, tier.contains_many, asked, default=None)
        else:  # a shared store: network or a shared filesystem, which can hang
            found = self._guard.call_bounded(
                tier.name, tier.contains_many, asked, namespace, default=None,
                timeout_s=self.lookup_timeout_s,
            )  # fmt: skip
        found = found or [False] * len(asked)
        for i, hit in zip(indices, found, strict=True):
            if hit:
                where[i] = tier.name
        return all(found)

    def load_async(
        self,
        block_hashes: list[bytes],
        kv_cache: torch.Tensor,
        block_ids: list[int],
        namespace: str = "",
    ) -> LoadHandle:
        """Copy `block_hashes[i]` into `kv_cache[:, :, block_ids[i]]` in the background.

        Stops at the first block it cannot find or that fails its check; `handle.num_loaded`
        leading blocks are valid once `handle.done()`.
        """
        # Blocks all in host RAM are issued from the caller's (the engine's) thread.
        inline = kv_cache.is_cuda and self.host is not None and all(
            self.host.contains_many(block_hashes))  # fmt: skip
        return self._loader.submit(block_hashes, kv_cache, block_ids, inline=inline,
                                   namespace=namespace)  # fmt: skip

    def get(self, block_hash: bytes, namespace: str = "") -> bytes | None:
        """One block's payload (`kv_cache[:, :, b]` as bytes) from the fastest tier holding
        a sound copy, or None. A block found below host RAM is promoted upwards."""
        source = self._read(block_hash, namespace)
        if source is None:
            return None
        try:
            return source.payload.numpy().tobytes()
        finally:
            if source.release is not None:
                source.release()

    def _read(self, key: bytes, namespace: str) -> BlockSource | None:
        """The fastest sound copy of one block; one found below RAM is promoted into RAM."""
        host = self.host
        if host is not None and host.name in self.load_tiers:
            held = host.acquire(key)
            if held is not None:
                slot, payload = held
                self._count(host.name, hits=1, bytes_read=self.layout.block_nbytes)
                return BlockSource(host.name, payload, partial(host.release, slot))
            self._count(host.name, misses=1)
        found = self._read_stores(key, namespace)
        if found is None:
            return None
        store, payload = found
        # Dropped when the buffer is busy.
        self._writer.submit(key, payload, source=store.name, namespace=namespace)
        return BlockSource(store.name, payload_tensor(memoryview(payload)))

    def _sources(self, keys: list[bytes], namespace: str = "") -> Iterator[BlockSource]:
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
                found = self._read_stores(key, namespace)
                if found is None:
                    return
                yield BlockSource(found[0].name, payload_tensor(memoryview(found[1])))
        finally:
            for slot in held:
                if slot is not None:
                    host.release(slot)

    def _read_stores(
        self, key: bytes, namespace: str
    ) -> tuple[EntryStore, bytes | bytearray | memoryview] | None:
        for store in self.stores:
            if store.name in self.load_tiers:
                payload = self._read_store(store, key, namespace)
                if payload is not None:
                    return store, payload
        return None

    def _read_store(
        self, store: EntryStore, key: bytes, namespace: str
    ) -> bytes | bytearray | memoryview | None:
        entry = self._guarded(store, store.get, key, namespace, default=None)
        if entry is None:
            self._count(store.name, misses=1)
            return None
        try:
            payload = self.codecs[store.name].decode(key, entry, namespace)
        except EntryRejected as e:
            logger.warning(
                "kv %s: entry %s refused (%s); treating it as a miss",
                store.name,
                key.hex()[:16],
                e,
            )
            self._count(store.name, misses=1, rejected=1)
            self._guarded(store, store.discard, key, namespace, default=None)
            return None
        self._count(store.name, hits=1, bytes_read=self.layout.block_nbytes)
        return payload

    def _load_finished(self, handle: LoadHandle, seconds: float) -> None:
        with self._stats_lock:
            self._stats.loads += 1
            self._stats.blocks_loaded += handle.num_loaded
            self._stats.prefill_tokens_saved += handle.num_loaded * self.layout.block_size
            self._stats.observe_load_latency(seconds)

    # ---- write path ------------------------------------------------------------------------

    def put_async(
        self, block_hash: bytes, block: torch.Tensor | bytes | memoryview, namespace: str = ""
    ) -> bool:
        """Hand over one full block (`kv_cache[:, :, block_id]`, on any device, or its bytes).

        Never waits: the block is copied into a staging slot (on a GPU, asynchronously on the
        current stream, ahead of any later kernel that overwrites it) and stored by the
        writer thread. Returns False when the staging buffer is full and the block is dropped.
        """
        if self.host is not None and self.host.contains_many([block_hash])[0]:
            return True  # it came from the warehouse, or was handed over before
        accepted = self._writer.submit(block_hash, block, namespace=namespace)
        with self._stats_lock:
            if accepted:
                self._stats.puts += 1
            else:
                self._stats.puts_dropped += 1
        return accepted

    def put_blocks_async(
        self,
        block_hashes: list[bytes],
        kv_cache: torch.Tensor,
        block_ids: list[int],
        namespaces: list[str] | None = None,
    ) -> int:
        """Hand over `kv_cache[:, :, block_ids[i]]` named `block_hashes[i]`, all at once: the
        engine's evictions of one step, gathered in a few kernels and copies (`put_async`
        costs a temporary, a kernel and a copy per block). Never waits; returns how many
        blocks were dropped because the staging buffer was full. `namespaces[i]`: the tenant
        namespace of block i (default: none)."""
        namespaces = namespaces or [""] * len(block_hashes)
        if self.host is not None:  # from the warehouse, or handed over before
            fresh = [i for i, held in enumerate(self.host.contains_many(block_hashes)) if not held]
            block_hashes = [block_hashes[i] for i in fresh]
            block_ids = [block_ids[i] for i in fresh]
            namespaces = [namespaces[i] for i in fresh]
        if not block_hashes:
            return 0
        accepted = self._writer.submit_blocks(block_hashes, kv_cache, block_ids, namespaces)
        dropped = len(block_hashes) - accepted
        with self._stats_lock:
            self._stats.puts += accepted
            self._stats.puts_dropped += dropped
        return dropped

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every block handed over so far is stored; False on timeout."""
        return self._writer.flush(timeout)

    def _store(
        self,
        keys: list[bytes],
        payloads: list[torch.Tensor],
        sources: list[str | None],
        namespaces: list[str],
    ) -> None:
        """Writer thread: put a batch of blocks where they belong. A source is None for the
        engine's blocks, else the tier a promoted block was read from."""
        disk_codec = self.codecs.get(self.disk.name) if self.disk is not None else None
        if self.host is not None:
            spill = self._admit_to_disk if self.disk is not None else None
            stored, spilled = self.host.put_many(keys, payloads, spill)
            for victim, victim_payload in spilled:
                self._write(self.disk, victim, disk_codec.encode(victim, victim_payload), "")
            if stored:
                self._count(self.host.name, blocks_written=stored,
                            bytes_written=stored * self.layout.block_nbytes)  # fmt: skip
        for key, payload, source, ns in zip(keys, payloads, sources, namespaces, strict=True):
            if self.host is None and self.disk is not None and source != self.disk.name:
                if self._admit_to_disk(key):
                    entry = disk_codec.encode(key, memoryview(payload.numpy()))
                    self._write(self.disk, key, entry, "")
            if source is None:
                # Shared stores take every block: their point is that another replica may
                # want it.
                sealed: bytes | None = None
                for store in self.shared:
                    if not self._guarded(store, store.contains_many, [key], ns, default=[True])[0]:
                        if sealed is None:  # the shared stores share one codec
                            sealed = self.codecs[store.name].encode(
                                key, memoryview(payload.numpy()), ns)
                        self._write(store, key, sealed, ns)

    def _admit_to_disk(self, key: bytes) -> bool:
        admitted = self.admission is None or self.admission.admits(key)
        if not admitted:
            with self._stats_lock:
                self._stats.admission_rejected += 1
        return admitted

    def _write(self, store: EntryStore, key: bytes, entry: bytes, namespace: str) -> None:
        if self._guarded(store, store.put, key, entry, namespace, default=False):
            self._count(store.name, blocks_written=1, bytes_written=len(entry))

    # ---- load or recompute -----------------------------------------------------------------

    def calibrate(
        self, prefill_tokens_per_s: float, device: torch.device | str = "cpu", reps: int = 8
    ) -> LoadDecision:
        """Measure each tier's load rate into `device` and keep only tiers that load faster
        than the engine prefills (`prefill_tokens_per_s`, measured by the engine at start)."""
        rates = measure_load_rates(self.layout, self.host, self.stores, device, reps, self.codecs)
        self._calibration = (prefill_tokens_per_s, device, reps)
        # A rate of 0 is a failed probe (unreachable, full or read-only): probed again later.
        self._failed_probes = {name for name, rate in rates.items() if rate == 0.0}
        self.decision = decide(prefill_tokens_per_s, rates)
        self.load_tiers = set(self.decision.load_tiers)
        logger.info(
            "kv warehouse: prefill %.0f tokens/s; load tokens/s %s; loading from %s",
            prefill_tokens_per_s,
            {k: round(v) for k, v in rates.items()},
            self.decision.load_tiers or "no tier (recompute is faster)",
        )
        return self.decision

    def reprobe_failed_tiers(self) -> list[str]:
        """Probe again the stores whose calibration probe failed; those that now load fast
        enough are loaded from again. Returns the tiers re-enabled (the upkeep thread calls
        this every `upkeep_interval_s`; a tier that recovered rejoins within that)."""
        if self._calibration is None or not self._failed_probes:
            return []
        prefill, _, reps = self._calibration
        stores = [s for s in self.stores if s.name in self._failed_probes]
        # Measured on the CPU: copies to a GPU from this thread would queue behind the
        # engine's work and time it instead. The tier's own I/O and check dominate anyway.
        rates = measure_load_rates(self.layout, None, stores, "cpu", reps, self.codecs)
        enabled = []
        for name, rate in rates.items():
            if rate == 0.0:
                continue
            self._failed_probes.discard(name)
            self.decision.load_tokens_per_s[name] = rate
            if rate >= prefill:
                enabled.append(name)
        if enabled:
            self.load_tiers = self.load_tiers | set(enabled)  # a new set: the engine reads it
            self.decision.load_tiers = [n for n in self.tier_names if n in self.load_tiers]
            logger.info("kv warehouse: %s recovered; loading from it again", enabled)
        return enabled

    def _upkeep(self) -> None:
        """Upkeep thread: the I/O that must stay off the engine's thread."""
        while not self._closed.wait(self._upkeep_interval_s):
            for store in self.shared:
                refresh = getattr(store, "refresh_usage", None)
                if refresh is not None:
                    self._guarded(store, refresh, default=None)
            try:
                self.reprobe_failed_tiers()
            except Exception:
                logger.exception("kv warehouse: probing failed tiers again failed")

    # ---- bookkeeping -----------------------------------------------------------------------

    def stats(self) -> WarehouseStats:
        """A snapshot of every counter, with each tier's current usage."""
        tiers: list[HostTier | EntryStore] = ([self.host] if self.host else []) + self.stores
        usage: dict[str, TierUsage | None] = {
            t.name: self._guarded(t, t.usage, default=None) for t in tiers  # no I/O
        }
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

    def _count_error(self, tier: str) -> None:
        self._count(tier, errors=1)

    def _guarded(self, tier: HostTier | EntryStore, fn: Callable[..., T], *args, default: T) -> T:
        """Call a tier; any failure becomes `default` and a counted, rate-limited warning."""
        return self._guard.call(tier.name, fn, *args, default=default)

    def close(self, timeout: float | None = 10.0) -> None:
        """Store what is queued (up to `timeout`), stop the threads, release the tiers."""
        self._closed.set()
        self._writer.close(timeout)
        self._loader.close(timeout)
        self._guard.close()
        tiers: list[HostTier | EntryStore] = ([self.host] if self.host else []) + self.stores
        for tier in tiers:
            self._guarded(tier, tier.close, default=None)


def default_ghost_capacity(disk: DiskTier) -> int:
    """Remember twice as many hashes as the disk holds blocks, within [4096, 2**20]."""
    return min(max(2 * disk.capacity_bytes // disk.entry_size, 4096), 1 << 20)
