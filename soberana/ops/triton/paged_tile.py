"""The inner loop shared by the Triton attention kernels: paged key/value tiles, online softmax."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def tile_block_ids(table_row_ptr, start, seq_len, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Cache block id of each key position `start:start+BLOCK_N` (0 past `seq_len`)."""
    pos = start + tl.arange(0, BLOCK_N)
    return tl.load(table_row_ptr + pos // BLOCK_SIZE, mask=pos < seq_len, other=0)


@triton.jit
def attend_paged_tile(
    q,
    row_max,
    row_sum,
    acc,
    k_cache_ptr,
    v_cache_ptr,
    block,
    head_offset,
    start,
    row_pos,
    seq_len,
    scale_log2,
    stride_cache_block,
    stride_cache_slot,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Fold keys `start:start+BLOCK_N` into the running max, sum and output `acc`.

    `block` holds each key's cache block id (`tile_block_ids`). Callers load it one tile
    ahead and carry it through the loop: block ids loaded in the same iteration as the K/V
    they address make Triton 3.6's pipeliner wait for every copy in flight (`cp.async.wait_group
    0`), which serialises loads and matrix work; carried ids keep two tiles of K/V in flight.
    Rows of `q` are queries at positions `row_pos`; with MASKED, a row sees only keys at
    positions `<= row_pos` and `< seq_len`. Without it the caller guarantees every key in
    the tile is visible to every row. Scores are in log2 units (`scale_log2` includes log2 e).
    """
    pos = start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, DIM_PAD)
    dim_ok = dims < HEAD_DIM
    key_off = (
        block.to(tl.int64) * stride_cache_block
        + (pos % BLOCK_SIZE) * stride_cache_slot
        + head_offset
    )
    if MASKED:
        in_seq = pos < seq_len
        k_mask = dim_ok[:, None] & in_seq[None, :]
        v_mask = in_seq[:, None] & dim_ok[None, :]
    else:
        k_mask = dim_ok[:, None]
        v_mask = dim_ok[None, :]
    # K is read transposed, [DIM_PAD, BLOCK_N], so the score product needs no transpose.
    # An FP8 cache (per-tensor scale 1.0, attention.KV_FP8_SCALE) is widened to the query
    # dtype in registers; for a cache in the model dtype the casts are no-ops.
    k = tl.load(k_cache_ptr + key_off[None, :] + dims[:, None], mask=k_mask, other=0.0).to(q.dtype)
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
    if MASKED:
        visible = (pos[None, :] <= row_pos[:, None]) & in_seq[None, :]
        s = tl.where(visible, s, float("-inf"))
    # Every caller's first tile holds a visible key for every row, so m_new is finite.
    max_new = tl.maximum(row_max, tl.max(s, 1))
    alpha = tl.exp2(row_max - max_new)
    p = tl.exp2(s - max_new[:, None])
    row_sum = row_sum * alpha + tl.sum(p, 1)
    v = tl.load(v_cache_ptr + key_off[:, None] + dims[None, :], mask=v_mask, other=0.0).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return max_new, row_sum, acc


@triton.jit
def attend_paged_tiles(
    q,
    row_max,
    row_sum,
    acc,
    k_cache_ptr,
    v_cache_ptr,
    table_row_ptr,
    head_offset,
    first_tile,
    end_tile,
    row_pos,
    seq_len,
    scale_log2,
    stride_cache_block,
    stride_cache_slot,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """attend_paged_tile over key tiles [first_tile, end_tile) of BLOCK_N, each tile's block
    ids loaded one tile ahead (see there); returns the running max, sum and `acc`."""
    block = tile_block_ids(table_row_ptr, first_tile * BLOCK_N, seq_len, BLOCK_SIZE, BLOCK_N)
    for tile in range(first_tile, end_tile):
        next_block = tile_block_ids(table_row_ptr, (tile + 1) * BLOCK_N, seq_len, BLOCK_SIZE,
                                    BLOCK_N)  # fmt: skip
        row_max, row_sum, acc = attend_paged_tile(
            q, row_max, row_sum, acc, k_cache_ptr, v_cache_ptr, block, head_offset,
            tile * BLOCK_N, row_pos, seq_len, scale_log2, stride_cache_block, stride_cache_slot,
            HEAD_DIM, DIM_PAD, BLOCK_SIZE, BLOCK_N, MASKED, DOT_PRECISION,
        )  # fmt: skip
        block = next_block
    return row_max, row_sum, acc


def dot_precision(dtype: torch.dtype) -> str:
    """Matrix-unit input precision for a cache dtype: exact float32 products for float32 caches."""
    return "ieee" if dtype == torch.float32 else "tf32"
