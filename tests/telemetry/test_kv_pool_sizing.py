"""The KV pool is sized so the whole card, other processes included, stays under the limit."""

from __future__ import annotations

import torch

from soberana.engine.config import EngineConfig
from soberana.engine.worker import num_kv_blocks

GiB = 2**30


def blocks_with(monkeypatch, free: int, total: int, utilization: float) -> int:
    """The worker's pool size on a CUDA device whose driver reports `free` of `total`
    (the CUDA runtime's memory query is the hardware boundary replaced here)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    config = EngineConfig(gpu_memory_utilization=utilization)
    return num_kv_blocks(config, torch.device("cuda", 0), bytes_per_block=GiB // 16,
                         max_len=4096, activation_bytes=GiB)


def test_memory_of_other_processes_shrinks_the_pool(monkeypatch):
    total = 80 * GiB
    alone = blocks_with(monkeypatch, free=64 * GiB, total=total, utilization=0.9)  # 16 GiB weights
    shared = blocks_with(monkeypatch, free=44 * GiB, total=total, utilization=0.9)  # +20 GiB other
    assert alone - shared == 20 * 16  # every GiB another process holds is a GiB less KV
    # After the pool, weights + others + activations + 1 GiB reserve + KV = 90% of the card.
    pool = shared * GiB // 16
    assert (total - 44 * GiB) + GiB + GiB + pool == int(0.9 * total)


def test_no_room_left_gives_an_empty_pool_not_a_negative_one(monkeypatch):
    assert blocks_with(monkeypatch, free=5 * GiB, total=80 * GiB, utilization=0.9) == 0
