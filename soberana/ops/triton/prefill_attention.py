"""Causal attention of a packed variable-length batch of queries over the paged KV cache.

Serves prefills, chunked prefills and prefix-cache hits alike: request `i`'s `q_len` queries
sit at the last `q_len` positions of its `seq_lens[i]` context and attend causally to every
cached and new key. One program takes `BLOCK_M` rows made of `BLOCK_M // G` query tokens
times the `G` query heads sharing a kv head, so each key tile read serves the whole group
(the row layout of vLLM's unified Triton attention). The grid is sized from host-known shapes
and each program finds its request by binary search, so the launch needs no host sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from soberana.ops.triton.checks import check_batch, check_cache_pair, check_output, check_query
from soberana.ops.triton.paged_tile import attend_paged_tile, dot_precision, tile_block_ids


@dataclass(frozen=True)
class PrefillConfig:
    """Launch parameters of the prefill kernel (`block_m` rows = query tokens x group heads)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def default_prefill_config(
    head_dim: int, dtype: torch.dtype, max_query_len: int, queries_per_kv: int
) -> PrefillConfig:
    """Tile shape tuned on an H200; short queries get fewer rows so the tile is not padding."""
    # Shapes chosen for no register spills (ptxas report for sm_90) and the H200 sweep.
    if dtype == torch.float32:
        # float32 dots run on FMA units, whose operand tiles live in registers.
        block_m, block_n, warps, stages = 32, 32, 8, 2
    elif head_dim <= 64:
        block_m, block_n, warps, stages = 128, 64, 4, 3
    elif head_dim <= 128:
        block_m, block_n, warps, stages = 128, 64, 8, 3
    else:
        block_m, block_n, warps, stages = 64, 32, 8, 2
    rows_needed = triton.next_power_of_2(max(1, max_query_len) * queries_per_kv)
    block_m = max(16, triton.next_power_of_2(queries_per_kv), min(block_m, rows_needed))
    if block_m < 64 and dtype != torch.float32:
        warps = 4  # below 64 rows there is no warpgroup MMA to feed
    return PrefillConfig(block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages)


@triton.jit
def _find_seq(query_start_loc_ptr, tile_id, num_seqs, block_q):
    """Last request whose first tile number (`query_start_loc[i] // block_q + i`) is <= tile_id."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // block_q + mid
        if first_tile <= tile_id:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# Runtime-varying ints are not specialised (==1, %16): one compiled variant serves every batch
# instead of a JIT compile stalling the first step of each new shape class while serving.
@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    block_table_ptr,
    scale_log2,
    num_seqs,
    queries_per_kv,
    block_q,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_bt,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    kv_head = tl.program_id(1)
    # Request i owns tile numbers [qsl[i] // block_q + i, qsl[i+1] // block_q + i + 1), at least
    # cdiv(q_len, block_q) of them; spare numbers exit below. Numbering is reversed so that a
    # request's last, longest tiles launch first and the short ones fill in behind them.
    first_tile_of_batch = tl.load(query_start_loc_ptr) // block_q
    tile_id = first_tile_of_batch + tl.num_programs(0) - 1 - tl.program_id(0)
    seq = _find_seq(query_start_loc_ptr, tile_id, num_seqs, block_q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    local_tile = tile_id - (q_start // block_q + seq)
    if local_tile * block_q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, DIM_PAD)
    row_token = local_tile * block_q + rows // queries_per_kv
    row_head = kv_head * queries_per_kv + rows % queries_per_kv
    row_ok = (rows < block_q * queries_per_kv) & (row_token < q_len)
    row_pos = first_pos + row_token
    io_mask = row_ok[:, None] & (dims < HEAD_DIM)[None, :]
    token = (q_start + row_token).to(tl.int64)
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + row_head[:, None] * stride_qh + dims[None, :],
        mask=io_mask,
        other=0.0,
    )

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
    table_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    head_offset = kv_head * stride_cache_head
    tile_first_pos = first_pos + local_tile * block_q
    tile_end_pos = first_pos + tl.minimum(local_tile * block_q + block_q, q_len)
    # Key tiles that end at or before the tile's first query are visible to every row.
    unmasked_end = (tile_first_pos + 1) // BLOCK_N * BLOCK_N
    # Block ids are loaded one tile ahead (see attend_paged_tile).
    block = tile_block_ids(table_row, 0, seq_len, BLOCK_SIZE, BLOCK_N)
    for start in range(0, unmasked_end, BLOCK_N):
        next_block = tile_block_ids(table_row, start + BLOCK_N, seq_len, BLOCK_SIZE, BLOCK_N)
        row_max, row_sum, acc = attend_paged_tile(
            q, row_max, row_sum, acc, k_cache_ptr, v_cache_ptr, block, head_offset, start, row_pos,
            seq_len, scale_log2, stride_cache_block, stride_cache_slot,
            HEAD_DIM, DIM_PAD, BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION,
        )  # fmt: skip
        block = next_block
    for start in range(unmasked_end, tile_end_pos, BLOCK_N):
        next_block = tile_block_ids(table_row, start + BLOCK_N, seq_len, BLOCK_SIZE, BLOCK_N)
        row_max, row_sum, acc = attend_paged_tile(
            q, row_max, row_sum, acc, k_cache_ptr, v_cache_ptr, block, head_offset, start, row_pos,
            seq_len, scale_log2, stride_cache_block, stride_cache_slot,
            HEAD_DIM, DIM_PAD, BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION,
        )  # fmt: skip
        block = next_block

    result = acc / row_sum[:, None]
    o_off = token[:, None] * stride_ot + row_head[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptr + o_off, result.to(out_ptr.dtype.element_ty), mask=io_mask)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    max_query_len: int,
    out: torch.Tensor | None = None,
    config: PrefillConfig | None = None,
) -> torch.Tensor:
    """Causal attention of packed queries `q` `[num_tokens, num_heads, head_dim]` over the cache.

    Request `i`'s queries are rows `query_start_loc[i]:query_start_loc[i+1]` of `q`; their
    keys (cached prefix and new tokens, already written) are the first `seq_lens[i]` slots of
    the blocks in `block_table[i]`. Rows of `q` outside every request are left unwritten in
    `out`. `max_query_len` (the longest request's query count) only picks the tile shape: any
    value gives correct results, so a CUDA graph captured with one value replays correctly.
    """
    check_cache_pair(k_cache, v_cache)
    check_query(q, k_cache)
    check_batch(seq_lens, block_table)
    if query_start_loc.dtype != torch.int32 or query_start_loc.shape != (seq_lens.shape[0] + 1,):
        raise ValueError(
            f"query_start_loc must be int32 [{seq_lens.shape[0] + 1}], got "
            f"{query_start_loc.dtype} {tuple(query_start_loc.shape)}"
        )
    if max_query_len < 1:
        raise ValueError(f"max_query_len must be >= 1, got {max_query_len}")
    if out is None:
        out = torch.empty_like(q)
    check_output(out, q)
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0 or num_tokens == 0:
        return out
    queries_per_kv = num_heads // num_kv_heads
    cfg = config or default_prefill_config(head_dim, q.dtype, max_query_len, queries_per_kv)
    if cfg.block_m < queries_per_kv:
        raise ValueError(f"block_m {cfg.block_m} must hold the {queries_per_kv} heads of a group")
    block_q = cfg.block_m // queries_per_kv
    # An upper bound on the tile numbers in use (see the kernel); it needs no device values.
    num_tiles = num_tokens // block_q + num_seqs
    _prefill_kernel[(num_tiles, num_kv_heads)](
        q, k_cache, v_cache, out, query_start_loc, seq_lens, block_table,
        scale * math.log2(math.e), num_seqs, queries_per_kv, block_q,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        HEAD_DIM=head_dim,
        DIM_PAD=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    return out
