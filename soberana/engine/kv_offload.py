"""The engine's side of the KV warehouse: what leaves the block pool and what comes back.

Write path: a cached block the pool is about to reuse is handed to the warehouse
(`BlockPool.on_evict`), all of a scheduler step's at once (`flush_evictions`); with
write-through, every block is handed over as soon as it is full, so another replica can reuse
it before anything is evicted here.
Read path: at admission the scheduler asks for the request's blocks past its GPU prefix hit;
found blocks are loaded into freshly allocated pool blocks in the background while other
requests run, and are registered in the prefix cache only once they are in place.

Under tensor parallelism each rank's pool holds only its KV heads, and the warehouse (in
this process, rank 0's) stores whole blocks: blocks going out are gathered from every rank
first (`sharded.gather_blocks`); blocks coming in are loaded into a whole-block buffer here
and scattered to the ranks' pools once the load has ended (docs/distributed.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from soberana.engine.kv_cache_manager import KVCacheManager
from soberana.engine.request import Request
from soberana.kv.loader import STAGING_BYTES

if TYPE_CHECKING:
    from soberana.kv.loader import LoadHandle
    from soberana.kv.warehouse import KVWarehouse

log = logging.getLogger("soberana.engine")


@dataclass
class _Load:
    request: Request
    handle: LoadHandle
    first_block: int  # index in the request's block table of the first loaded block
    # Tensor parallel: whole blocks land here, then go to every rank's pool at `block_ids`.
    whole: torch.Tensor | None = None
    block_ids: list[int] | None = None


class KVOffload:
    def __init__(
        self,
        warehouse: KVWarehouse,
        kv: KVCacheManager,
        kv_cache: torch.Tensor,
        write_through: bool,
        sharded=None,
    ) -> None:
        self.warehouse = warehouse
        self.kv = kv
        self.kv_cache = kv_cache
        self.write_through = write_through
        # Tensor parallel: rank 0's TPModel, which gathers and scatters whole blocks.
        self.sharded = sharded
        self.loads: dict[tuple[str, int], _Load] = {}
        self.cancelled: list[_Load] = []  # aborted while loading: freed once the copy ends
        self.num_written: dict[tuple[str, int], int] = {}  # leading blocks already handed over
        # (hash, block id, tenant namespace) evicted since the last flush; their contents are
        # intact until something is launched that writes the blocks.
        self.evicted: list[tuple[bytes, int, str]] = []
        if not write_through:  # with write-through every full block is out already
            kv.pool.on_evict = self._on_evict

    def _on_evict(self, block_hash: bytes, block_id: int) -> None:
        salt = self.kv.pool.blocks[block_id].cache_salt
        self.evicted.append((block_hash, block_id, self.warehouse.namespace_of(salt)))

    def flush_evictions(self) -> None:
        """Hand this step's evicted blocks to the warehouse in one batch. Call before
        launching anything that may write them: the copies are queued on the current stream.
        """
        if not self.evicted:
            return
        hashes, ids, namespaces, seen = [], [], [], set()
        for block_hash, block_id, namespace in self.evicted:
            # A block evicted twice since the last flush was never computed under its second
            # name (nothing ran in between): only the first name holds its contents.
            if block_id not in seen:
                seen.add(block_id)
                hashes.append(block_hash)
                ids.append(block_id)
                namespaces.append(namespace)
        self.evicted.clear()
        # The pool evicts each sequence tail first; hand the blocks over head first, so that
        # if the staging buffer cannot take them all, what is dropped is tails (a block is
        # only reusable after its whole prefix, so a dropped head would waste its tail).
        self._put(hashes[::-1], ids[::-1], namespaces[::-1])

    def _put(self, hashes: list[bytes], block_ids: list[int], namespaces: list[str]) -> None:
        if self.sharded is None:
            self.warehouse.put_blocks_async(hashes, self.kv_cache, block_ids, namespaces)
            return
        host = self.warehouse.host
        if host is not None:  # blocks RAM holds need no gather (the warehouse skips them)
            fresh = [i for i, held in enumerate(host.contains_many(hashes)) if not held]
            hashes = [hashes[i] for i in fresh]
            block_ids = [block_ids[i] for i in fresh]
            namespaces = [namespaces[i] for i in fresh]
        step = max(1, STAGING_BYTES // self.warehouse.layout.block_nbytes)  # bounds the gather
        for i in range(0, len(hashes), step):
            whole = self.sharded.gather_blocks(block_ids[i:i + step])
            self.warehouse.put_blocks_async(hashes[i:i + step], whole,
                                            list(range(whole.shape[2])), namespaces[i:i + step])

    # ---- read path -------------------------------------------------------------------------

    def loadable_blocks(self, request: Request, num_cached_blocks: int) -> int:
        """How many blocks after the GPU prefix hit the warehouse can load (asked once)."""
        last = (request.num_tokens - 1) // self.kv.block_size
        hashes = request.block_hashes[num_cached_blocks:last]
        if not hashes:
            return 0
        namespace = self.warehouse.namespace_of(request.cache_salt)
        return len(self.warehouse.lookup_prefix(hashes, namespace))

    def start_load(self, request: Request, first_block: int, num_blocks: int) -> None:
        """Copy the request's blocks [first_block, first_block + num_blocks) in."""
        table = self.kv.block_table(request)[first_block:first_block + num_blocks]
        hashes = request.block_hashes[first_block:first_block + num_blocks]
        self.flush_evictions()  # the blocks just allocated may be evicted ones: copy them first
        namespace = self.warehouse.namespace_of(request.cache_salt)
        if self.sharded is None:
            handle = self.warehouse.load_async(hashes, self.kv_cache, table, namespace)
            self.loads[request.key] = _Load(request, handle, first_block)
            return
        shape = self.warehouse.layout.block_shape
        whole = torch.empty(shape[:2] + (num_blocks,) + shape[2:], dtype=self.kv_cache.dtype,
                            device=self.kv_cache.device)
        handle = self.warehouse.load_async(hashes, whole, list(range(num_blocks)), namespace)
        self.loads[request.key] = _Load(request, handle, first_block, whole, list(table))

    def finished_loads(self) -> list[tuple[Request, int]]:
        """Requests whose load ended, with the number of valid blocks now in the pool
        (counted from the start of the sequence); their blocks are registered."""
        for load in [c for c in self.cancelled if c.handle.done()]:
            self.cancelled.remove(load)
            self.kv.free(load.request)
        done = []
        for key, load in list(self.loads.items()):
            if not load.handle.done():
                continue
            del self.loads[key]
            n = load.handle.num_loaded
            if load.whole is not None and n > 0:
                self.sharded.scatter_blocks(load.whole[:, :, :n], load.block_ids[:n])
            valid = load.first_block + n
            self.kv.register_prefix(load.request, valid)
            self.num_written[key] = valid  # loaded blocks are in the warehouse already
            done.append((load.request, valid))
        return done

    def wait_any(self, timeout: float) -> None:
        """Block briefly on a pending load (the engine has nothing else to run)."""
        for load in self.loads.values():
            load.handle.wait(timeout)
            return

    def cancel(self, request: Request) -> bool:
        """Stop a loading request; True if it was loading (its blocks are freed later)."""
        load = self.loads.pop(request.key, None)
        if load is None:
            return False
        load.handle.cancel()
        self.cancelled.append(load)
        return True

    # ---- write path ------------------------------------------------------------------------

    def admitted(self, request: Request, num_cached_blocks: int) -> None:
        """Blocks found in the GPU pool need not be written again."""
        self.num_written[request.key] = num_cached_blocks

    def after_step(self, requests: list[Request]) -> None:
        """Write-through: hand over every block that became full in this step."""
        if not self.write_through:
            return
        bs = self.kv.block_size
        for r in requests:
            # Blocks whose last id is still in flight (async scheduling) are not named yet.
            full = min(r.num_computed_tokens // bs, len(r.block_hashes))
            start = self.num_written.get(r.key, 0)
            if full <= start:
                continue
            table = self.kv.block_table(r)
            namespace = self.warehouse.namespace_of(r.cache_salt)
            self._put(r.block_hashes[start:full], table[start:full], [namespace] * (full - start))
            self.num_written[r.key] = full

    def forget(self, request: Request) -> None:
        self.num_written.pop(request.key, None)
