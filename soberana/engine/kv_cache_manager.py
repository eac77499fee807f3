"""Per-request block tables over the shared BlockPool, with prefix-cache lookup."""

from __future__ import annotations

from soberana.engine.block_hash import chain_hashes
from soberana.engine.block_pool import Block, BlockPool
from soberana.engine.request import Request


class KVCacheManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_caching: bool, hash_seed: bytes
    ) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.hash_seed = hash_seed
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[tuple[str, int], list[Block]] = {}
        self.num_registered: dict[tuple[str, int], int] = {}  # blocks named in the cache
        self.prefix_queries = 0  # tokens looked up (cumulative)
        self.prefix_hits = 0  # tokens found (cumulative)

    def block_table(self, request: Request) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request.key, ())]

    def _update_hashes(self, request: Request) -> None:
        # Only blocks that became full since the last call are hashed, from a slice of the
        # tokens: no copy of the whole sequence on the engine's hot path.
        if not self.enable_caching:
            return
        done = len(request.block_hashes)
        full = request.num_known_tokens // self.block_size  # never hash a placeholder
        if full > done:
            start = done * self.block_size
            new = chain_hashes(
                request.block_hashes[-1] if done else self.hash_seed,
                request.token_slice(start, full * self.block_size), self.block_size,
                request.cache_salt,
            )
            request.block_hashes.extend(new)

    def find_cached_prefix(self, request: Request) -> list[Block]:
        """The longest run of the request's leading full blocks already in the pool.

        At least one token is always left to compute: its logits give the next token.
        """
        if not self.enable_caching or request.wants_prompt_logprobs:
            return []
        self._update_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[Block] = []
        for h in request.block_hashes[:max_blocks]:
            block = self.pool.lookup(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted request's prefix-cache lookup (vLLM's queries/hits, in tokens)."""
        if self.enable_caching:
            self.prefix_queries += num_tokens
            self.prefix_hits += num_hit_tokens

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        cached: list[Block] | None = None,
        register: bool = True,
    ) -> bool:
        """Give the request blocks for `num_new_tokens` more tokens; False if the pool is short.

        On success the blocks that become full are registered in the prefix cache at once:
        this step's forward pass writes every new key before any attention reads it.
        `register=False` is for blocks the KV warehouse fills later (`register_prefix`).
        """
        cached = cached or []
        held = self.req_blocks.get(request.key, [])
        num_computed = request.num_computed_tokens + len(cached) * self.block_size
        needed = -(-(num_computed + num_new_tokens) // self.block_size) - len(held) - len(cached)
        # Cached blocks sitting in the free queue stop being free once touched.
        revived = sum(1 for b in cached if b.ref_cnt == 0)
        if needed > self.pool.num_free_blocks - revived:
            return False
        if cached:
            self.pool.touch(cached)
        blocks = held + cached + (self.pool.allocate(needed) if needed > 0 else [])
        self.req_blocks[request.key] = blocks
        if register:
            self._register_full(request, num_computed + num_new_tokens)
        else:
            self.num_registered[request.key] = len(held) + len(cached)
        return True

    def register_computed(self, request: Request) -> None:
        """Register the full blocks of computed tokens (async scheduling: once a placeholder
        that completed a block has its id)."""
        self._register_full(request, request.num_computed_tokens)

    def register_prefix(self, request: Request, num_blocks: int) -> None:
        """Register the request's first `num_blocks` blocks, now that their contents are in."""
        self._register_full(request, num_blocks * self.block_size)

    def _register_full(self, request: Request, num_tokens: int) -> None:
        if not self.enable_caching:
            return
        num_full = min(num_tokens, request.num_known_tokens) // self.block_size
        start = self.num_registered.get(request.key, 0)
        if num_full <= start:
            return
        self._update_hashes(request)
        blocks = self.req_blocks[request.key]
        for i in range(start, num_full):
            self.pool.register(blocks[i], request.block_hashes[i], request.cache_salt)
        self.num_registered[request.key] = num_full

    def truncate(self, request: Request, num_tokens: int) -> None:
        """Free the request's blocks past those holding its first `num_tokens` positions
        (speculative decoding: the slots of rejected drafts). They were never registered:
        registration stops at the known tokens, and drafts are not among them."""
        blocks = self.req_blocks.get(request.key)
        keep = -(-num_tokens // self.block_size)
        if blocks is not None and len(blocks) > keep:
            tail = blocks[keep:]
            del blocks[keep:]
            self.pool.free(list(reversed(tail)))

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first so that shared heads stay cached longest."""
        blocks = self.req_blocks.pop(request.key, [])
        self.num_registered.pop(request.key, None)
        self.pool.free(list(reversed(blocks)))

    def usage(self) -> float:
        return self.pool.usage()
