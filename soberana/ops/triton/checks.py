"""Host-side argument checks shared by the Triton paged-attention ops (shapes only, no sync)."""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# An FP8 cache (--kv-cache-dtype fp8) holds keys and values of queries in any of those.
CACHE_DTYPES = (*SUPPORTED_DTYPES, torch.float8_e4m3fn)


def check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Raise ValueError unless the caches are matching `[num_blocks, block_size, num_kv_heads, head_dim]`."""
    if k_cache.dim() != 4:
        raise ValueError(
            "k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got shape {tuple(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"v_cache {tuple(v_cache.shape)} {v_cache.dtype} must match "
            f"k_cache {tuple(k_cache.shape)} {k_cache.dtype}"
        )
    # The kernels address both caches with one set of strides.
    if v_cache.stride() != k_cache.stride() or k_cache.stride(3) != 1:
        raise ValueError(
            f"k_cache and v_cache must share strides with head_dim contiguous, got "
            f"{k_cache.stride()} and {v_cache.stride()}"
        )
    if v_cache.device != k_cache.device:
        raise ValueError(f"k_cache is on {k_cache.device} but v_cache is on {v_cache.device}")
    if k_cache.dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype must be one of {CACHE_DTYPES}, got {k_cache.dtype}")


def check_query(q: torch.Tensor, k_cache: torch.Tensor) -> None:
    """Raise ValueError unless `q` is `[num_tokens, num_heads, head_dim]` fitting the cache."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if q.dim() != 3 or q.shape[2] != head_dim:
        raise ValueError(
            f"q must be [num_tokens, num_heads, {head_dim}], got shape {tuple(q.shape)}"
        )
    if q.shape[1] % num_kv_heads != 0:
        raise ValueError(
            f"q has {q.shape[1]} heads, which is not a multiple of the cache's "
            f"{num_kv_heads} kv heads"
        )
    if q.dtype != k_cache.dtype and k_cache.dtype != torch.float8_e4m3fn:
        raise ValueError(f"q dtype {q.dtype} must equal the cache dtype {k_cache.dtype} "
                         "(or the cache be float8_e4m3fn)")  # fmt: skip
    if q.stride(2) != 1:
        raise ValueError(f"q must be contiguous in head_dim, got strides {q.stride()}")
    if q.device != k_cache.device:
        raise ValueError(f"q is on {q.device} but the cache is on {k_cache.device}")


def check_batch(seq_lens: torch.Tensor, block_table: torch.Tensor) -> None:
    """Raise ValueError unless `seq_lens` is int32 `[B]` and `block_table` int32 `[B, max_blocks]`."""
    if seq_lens.dtype != torch.int32 or seq_lens.dim() != 1:
        raise ValueError(
            f"seq_lens must be a 1-D int32 tensor, got {seq_lens.dtype} {tuple(seq_lens.shape)}"
        )
    if block_table.dtype != torch.int32 or block_table.dim() != 2:
        raise ValueError(
            f"block_table must be a 2-D int32 tensor, got {block_table.dtype} {tuple(block_table.shape)}"
        )
    if block_table.shape[0] != seq_lens.shape[0]:
        raise ValueError(
            f"block_table has {block_table.shape[0]} rows but seq_lens has {seq_lens.shape[0]} entries"
        )
    if block_table.stride(1) != 1:
        raise ValueError(f"block_table rows must be contiguous, got strides {block_table.stride()}")


def check_output(out: torch.Tensor, q: torch.Tensor) -> None:
    """Raise ValueError unless `out` can receive an attention result shaped like `q`."""
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(
            f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, got "
            f"{tuple(out.shape)} {out.dtype} on {out.device}"
        )
    if out.stride(2) != 1:
        raise ValueError(f"out must be contiguous in head_dim, got strides {out.stride()}")
