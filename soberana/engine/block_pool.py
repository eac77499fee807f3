"""The paged KV block pool: reference counts, an LRU free queue, and the prefix-cache table."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class Block:
    __slots__ = ("block_id", "ref_cnt", "block_hash", "cache_salt")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None  # set once the block is full and registered
        # The salt the hash was computed under: the KV warehouse files the block under its
        # tenant, so that the tenant's blocks can be purged.
        self.cache_salt: str | None = None


class BlockPool:
    """Owns every block. Freed blocks keep their contents and hash and serve as cache until
    the LRU free queue hands them out again; only then is their hash forgotten."""

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # block_id -> None, oldest first: allocation takes from the front.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, Block] = {}
        # Called with (block_hash, block_id) just before a cached block's contents are lost;
        # the KV warehouse copies the block out here.
        self.on_evict: Callable[[bytes, int], None] | None = None

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def usage(self) -> float:
        """Fraction of blocks held by requests (free cached blocks count as free)."""
        return 1.0 - len(self.free_queue) / self.num_blocks

    def lookup(self, block_hash: bytes) -> Block | None:
        return self.cached.get(block_hash)

    def touch(self, blocks: list[Block]) -> None:
        """Take a reference on blocks found in the cache (they may be sitting free)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def allocate(self, n: int) -> list[Block]:
        """Take `n` blocks from the front of the free queue, evicting their cached contents."""
        if n > len(self.free_queue):
            raise RuntimeError(f"asked for {n} blocks with {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                if self.on_evict is not None:
                    self.on_evict(block.block_hash, block_id)
                if self.cached.get(block.block_hash) is block:
                    del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def free(self, blocks: list[Block]) -> None:
        """Drop one reference; blocks reaching zero join the back of the free queue in the
        given order (callers pass a sequence's blocks tail first, so tails are evicted first)."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None or not self.enable_caching:
                    # Nothing worth keeping: reuse it before any cached block.
                    block.block_hash = None
                    self.free_queue[block.block_id] = None
                    self.free_queue.move_to_end(block.block_id, last=False)
                else:
                    self.free_queue[block.block_id] = None

    def register(self, block: Block, block_hash: bytes, cache_salt: str | None = None) -> None:
        """Name a full block by its hash (computed under `cache_salt`) so later requests can
        reuse it."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached:
            return  # an identical block already serves this hash; this one stays anonymous
        block.block_hash = block_hash
        block.cache_salt = cache_salt
        self.cached[block_hash] = block
