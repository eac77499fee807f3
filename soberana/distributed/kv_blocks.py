"""Whole KV blocks out of and into the head-sharded pools: the KV warehouse under tensor
parallelism stores one *gathered* entry per block (every KV head once), not one per rank.

Rank r's pool holds KV heads [kv_head_start, kv_head_start + num_kv_heads) of every block
(`TPShard`). With fewer KV heads than ranks, ranks r*k .. r*k+k-1 hold the same head
(k = world // num_kv_heads): a whole block takes each head from the first of its holders.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from soberana.distributed.group import TPGroup
from soberana.distributed.sharding import TPShard

_HEADS = 4  # the KV-head axis of [layers, 2, blocks, slots, kv_heads, head_dim]


def whole_blocks(parts: list[torch.Tensor], num_kv_heads: int) -> torch.Tensor:
    """Every rank's `[layers, 2, n, slots, local_heads, dim]` -> `[..., num_kv_heads, dim]`."""
    step = max(1, len(parts) // num_kv_heads)  # replicated heads: the first holder's copy
    return torch.cat(parts[::step], dim=_HEADS)


def rank_heads(whole: torch.Tensor, shard: TPShard) -> torch.Tensor:
    """The heads of `whole` blocks that `shard`'s rank holds."""
    return whole.narrow(_HEADS, shard.kv_head_start, shard.num_kv_heads)


def gather_blocks(group: TPGroup, kv_cache: torch.Tensor, block_ids: list[int],
                  num_kv_heads: int) -> torch.Tensor | None:
    """Collective: rank 0 gets blocks `block_ids` with all `num_kv_heads` heads; others None."""
    ids = torch.tensor(block_ids, dtype=torch.long, device=kv_cache.device)
    # Bytes are moved, not values: gloo and the CPU's index/cat kernels have no float8 (an
    # fp8 KV pool), and a copy of bytes is exact for every dtype.
    local = kv_cache.view(torch.uint8).index_select(2, ids)
    parts = ([torch.empty_like(local) for _ in range(group.world_size)]
             if group.rank == 0 else None)
    dist.gather(local, parts, dst=0, group=group.device_group)
    if parts is None:
        return None
    return whole_blocks(parts, num_kv_heads).view(kv_cache.dtype)


def scatter_blocks(group: TPGroup, kv_cache: torch.Tensor, block_ids: list[int],
                   whole: torch.Tensor, shard: TPShard) -> None:
    """Collective: rank 0's `whole` blocks (others pass a buffer of their shape) written into
    every rank's pool at `block_ids`, each rank keeping its own heads."""
    raw = group.broadcast(whole.view(torch.uint8))  # bytes: see gather_blocks
    ids = torch.tensor(block_ids, dtype=torch.long, device=kv_cache.device)
    kv_cache.view(torch.uint8).index_copy_(2, ids, rank_heads(raw, shard))
