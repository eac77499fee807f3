"""Split-K (flash-decoding) attention of one query token per sequence over the paged KV cache.

Each (sequence, kv head) pair's context is cut into `num_splits` partitions that run as
separate programs, so a few long sequences still fill the GPU; a second kernel merges the
partitions' partial outputs by their log-sum-exp (Dao et al., "Flash-Decoding", 2023).
The split count depends only on host-known shapes, never on `seq_lens`' values, so the
launch is CUDA-graph safe: each program finds its share of its sequence on the device.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from soberana.ops.triton.checks import check_batch, check_cache_pair, check_output, check_query
from soberana.ops.triton.paged_tile import attend_paged_tiles, dot_precision

# Decode programs resident per SM with the default tile (4 warps, ~120 registers a thread).
_PROGRAMS_PER_SM = 4
MAX_SPLITS = 64


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the decode kernel; `num_splits=None` picks one from the batch shape."""

    tile_n: int
    num_warps: int
    num_stages: int
    num_splits: int | None = None


def default_decode_config(head_dim: int, dtype: torch.dtype) -> DecodeConfig:
    """Tile shape tuned on an H200 (benchmarks/gpu/attention_kernels.py --sweep), no spills."""
    if dtype == torch.float32:
        return DecodeConfig(tile_n=16, num_warps=4, num_stages=2)
    if head_dim > 128:
        return DecodeConfig(tile_n=32, num_warps=4, num_stages=2)
    return DecodeConfig(tile_n=64, num_warps=4, num_stages=2)


@functools.lru_cache(maxsize=8)
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(
    num_seqs: int, num_kv_heads: int, max_context: int, tile_n: int, num_sms: int
) -> int:
    """Partitions per context: the most that fit one wave of programs, at most one per key tile.

    A launch slightly over one wave leaves most SMs idle during its second wave (on an H200,
    B=16 decode at 32k read 3.4 TB/s with 5 splits and 4.3 TB/s with 4), so round down.
    """
    per_wave = _PROGRAMS_PER_SM * num_sms
    wanted = per_wave // max(1, num_seqs * num_kv_heads)
    return max(1, min(wanted, math.ceil(max_context / tile_n), MAX_SPLITS))


# Runtime-varying ints are not specialised (==1, %16): no JIT compile for new batch shapes.
@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,
    seq_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    scale_log2,
    num_splits,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_bt,
    QUERIES_PER_KV: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * QUERIES_PER_KV

    seq_len = tl.load(seq_lens_ptr + seq)
    num_tiles = tl.cdiv(seq_len, TILE_N)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_start = split * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, num_tiles)

    # All query heads that share this kv head are rows of one tile, so K/V are read once.
    group = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, DIM_PAD)
    heads = kv_head * QUERIES_PER_KV + group
    row_ok = group < QUERIES_PER_KV
    io_mask = row_ok[:, None] & (dims < HEAD_DIM)[None, :]
    q_off = seq.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_off, mask=io_mask, other=0.0)

    row_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    row_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    row_pos = tl.full([GROUP_PAD], 0, tl.int32) + seq_len - 1
    table_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    row_max, row_sum, acc = attend_paged_tiles(
        q, row_max, row_sum, acc, k_cache_ptr, v_cache_ptr, table_row,
        kv_head * stride_cache_head, tile_start, tile_end, row_pos, seq_len, scale_log2,
        stride_cache_block, stride_cache_slot, HEAD_DIM, DIM_PAD, BLOCK_SIZE, TILE_N, True,
        DOT_PRECISION,
    )  # fmt: skip

    # row_sum == 0 only when the partition is empty (a short or zero-length sequence).
    safe_sum = tl.where(row_sum > 0, row_sum, 1.0)
    result = acc / safe_sum[:, None]
    if SINGLE_SPLIT:
        o_off = seq.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptr + o_off, result.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        part = (seq.to(tl.int64) * num_heads + heads) * num_splits + split
        lse = tl.where(row_sum > 0, row_max + tl.log2(safe_sum), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=row_ok)
        # An empty partition's output is never read (its lse is -inf), so it is not written.
        tl.store(
            part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :],
            result,
            mask=io_mask & (row_sum > 0)[:, None],
        )


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    num_splits,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, DIM_PAD)
    base = (seq.to(tl.int64) * tl.num_programs(1) + head) * num_splits
    lse = tl.load(part_lse_ptr + base + splits, mask=splits < num_splits, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    # All partitions are empty only for a zero-length sequence (batch padding): output 0.
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weight = tl.exp2(lse - lse_max)
    filled = lse > float("-inf")
    parts = tl.load(
        part_out_ptr + (base + splits)[:, None] * HEAD_DIM + dims[None, :],
        mask=filled[:, None] & (dims < HEAD_DIM)[None, :],
        other=0.0,
    )
    total = tl.sum(weight, 0)
    result = tl.sum(parts * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    o_off = seq.to(tl.int64) * stride_ot + head * stride_oh + dims
    tl.store(out_ptr + o_off, result.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """Attention of `q` `[B, num_heads, head_dim]`, one token per sequence, over its paged context.

    Sequence `i` attends to the `seq_lens[i]` keys (its own included) in the blocks listed by
    `block_table[i]`; a zero-length sequence (batch padding) yields zeros.
    """
    check_cache_pair(k_cache, v_cache)
    check_query(q, k_cache)
    check_batch(seq_lens, block_table)
    if q.shape[0] != seq_lens.shape[0]:
        raise ValueError(
            f"decode takes one query token per sequence: q has {q.shape[0]} tokens for "
            f"{seq_lens.shape[0]} sequences"
        )
    if out is None:
        out = torch.empty_like(q)
    check_output(out, q)
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_seqs == 0:
        return out
    cfg = config or default_decode_config(head_dim, q.dtype)
    num_splits = cfg.num_splits or choose_num_splits(
        num_seqs, num_kv_heads, block_table.shape[1] * block_size, cfg.tile_n, num_sms(q.device)
    )
    queries_per_kv = num_heads // num_kv_heads
    dim_pad = triton.next_power_of_2(head_dim)
    single = num_splits == 1
    if single:
        part_out = part_lse = out  # unused by the single-split kernel
    else:
        part_out = torch.empty(
            (num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
        )
        part_lse = torch.empty(
            (num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device
        )
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_table, seq_lens, out, part_out, part_lse,
        scale * math.log2(math.e), num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        QUERIES_PER_KV=queries_per_kv,
        GROUP_PAD=max(16, triton.next_power_of_2(queries_per_kv)),
        HEAD_DIM=head_dim,
        DIM_PAD=dim_pad,
        BLOCK_SIZE=block_size,
        TILE_N=cfg.tile_n,
        SINGLE_SPLIT=single,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    if not single:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            part_out, part_lse, out, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim,
            DIM_PAD=dim_pad,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            num_warps=4,
        )  # fmt: skip
    return out
