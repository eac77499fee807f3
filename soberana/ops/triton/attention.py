"""Triton paged attention for GPUs: the KV write and attention over a mixed decode/prefill step.

Layout and metadata are the engine contract (docs/engine-core.md): per layer `k_cache` and
`v_cache` are `[num_blocks, block_size, num_kv_heads, head_dim]`; a step packs `B` requests,
the `num_decodes` one-token requests first. Importing this module needs `triton`; the CPU path
lives in `soberana/ops/attention.py`.
"""

from __future__ import annotations

import torch

from soberana.ops.attention import AttentionMetadata
from soberana.ops.triton.cache_write import reshape_and_cache
from soberana.ops.triton.decode_attention import DecodeConfig, paged_decode_attention
from soberana.ops.triton.fused_decode_attention import fused_decode_attention
from soberana.ops.triton.prefill_attention import PrefillConfig, paged_prefill_attention

__all__ = [
    "DecodeConfig",
    "PrefillConfig",
    "fused_decode_attention",
    "paged_decode_attention",
    "paged_prefill_attention",
    "reshape_and_cache",
    "triton_paged_attention",
]


def triton_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention for a packed step `q` `[num_tokens, num_heads, head_dim]`: decodes, then prefills.

    The step's new keys and values must already be in the cache (`reshape_and_cache`).
    """
    if out is None:
        out = torch.empty_like(q)
    num_seqs = meta.seq_lens.shape[0]
    num_decodes = meta.num_decodes
    if not 0 <= num_decodes <= num_seqs:
        raise ValueError(f"num_decodes must be in [0, {num_seqs}], got {num_decodes}")
    if num_decodes > 0:
        # Decodes come first with one token each, so their queries are rows 0..num_decodes-1.
        paged_decode_attention(
            q[:num_decodes],
            k_cache,
            v_cache,
            meta.seq_lens[:num_decodes],
            meta.block_table[:num_decodes],
            scale,
            out=out[:num_decodes],
        )
    if num_decodes < num_seqs:
        # Host-side lengths size the prefill tile without reading device memory.
        max_query_len = max(meta.query_lens_cpu[num_decodes:])
        paged_prefill_attention(
            q,
            k_cache,
            v_cache,
            meta.query_start_loc[num_decodes:],
            meta.seq_lens[num_decodes:],
            meta.block_table[num_decodes:],
            scale,
            max_query_len,
            out=out,
        )
    return out
