"""Decode attention fused with what precedes it: q/k RMSNorm (Qwen3), rotary embedding, the
new token's KV write and split-K attention, with the partitions merged in the same launch.

A decode-only step otherwise runs four to six small kernels per layer between the qkv and
o projections (norms, rotary, cache write, attention, the split merge); at batch 1 their
launches and gaps cost as much as the attention itself. Here one program per (sequence,
kv head, partition):
- reads its query heads and the new key/value straight from the fused qkv projection,
  normalises and rotates them in registers (rounding where `layers.py` rounds, so the
  result equals the unfused chain);
- partition 0 writes the new key/value to their cache slot and folds the new token into its
  softmax from registers, so no program reads a slot that is being written;
- every partition folds its share of the cached keys `[0, seq_len - 1)`;
- with several partitions, each stores its partial output, and the last one to finish (an
  atomic counter per (sequence, kv head), reset by that program) merges them by log-sum-exp;
- on Hopper and later it is a programmatic dependent launch that waits for the qkv
  projection inside the kernel, so its launch overlaps that kernel's tail.
The partition count is launched from host-known shapes (CUDA-graph safe); on the device each
sequence uses only as many partitions as its context has key tiles (`_MIN_TILES` or more
each), and a context of one tile needs no merge.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from soberana.ops.triton.cache_write import to_cache
from soberana.ops.triton.checks import check_batch, check_cache_pair
from soberana.ops.triton.decode_attention import (
    MAX_SPLITS,
    DecodeConfig,
    choose_num_splits,
    default_decode_config,
    num_sms,
)
from soberana.ops.triton.gemv import supports_pdl
from soberana.ops.triton.paged_tile import attend_paged_tiles, dot_precision

# Key tiles per partition before a context is split further: on an H200 one tile per
# partition was fastest from 256 to 8k keys at batch 1 and 8 (decode_kernels.py --sweep).
_MIN_TILES = 1
_counters: dict[torch.device, torch.Tensor] = {}


@triton.jit
def _norm_rotate(x, x_rot, inv_rms, norm_w, norm_w_rot, cos, sin, sign,
                 QK_NORM: tl.constexpr):  # fmt: skip
    """Rotate-half rotary of rows `x` [R, D] given `x_rot` (x with its halves swapped).

    Computes `x * cos + rotate_half(x) * sin` rounding each product and the sum to the
    dtype, as the eager chain does; with QK_NORM the rows are RMS-normalised first.
    """
    dtype = x.dtype
    if QK_NORM:
        x = ((x.to(tl.float32) * inv_rms).to(dtype).to(tl.float32) * norm_w).to(dtype)
        x_rot = ((x_rot.to(tl.float32) * inv_rms).to(dtype).to(tl.float32) * norm_w_rot).to(dtype)
    c = cos.to(dtype).to(tl.float32)
    s = sin.to(dtype).to(tl.float32)
    a = (x.to(tl.float32) * c).to(dtype).to(tl.float32)
    b = (x_rot.to(tl.float32) * s).to(dtype).to(tl.float32)
    return (a + sign * b).to(dtype)


@triton.jit
def _load_heads(base, heads, row_ok, dims, dims_rot, dim_ok, eps, norm_w_ptr, cos, sin, sign,
                HEAD_DIM: tl.constexpr, QK_NORM: tl.constexpr):  # fmt: skip
    """Rows `heads` of one token's projection, normalised (QK_NORM) and rotated: [R, DIM_PAD]."""
    mask = row_ok[:, None] & dim_ok[None, :]
    x = tl.load(base + heads[:, None] * HEAD_DIM + dims[None, :], mask=mask, other=0.0)
    x_rot = tl.load(base + heads[:, None] * HEAD_DIM + dims_rot[None, :], mask=mask, other=0.0)
    inv_rms = 1.0
    norm_w = 1.0
    norm_w_rot = 1.0
    if QK_NORM:
        xf = x.to(tl.float32)
        inv_rms = tl.math.rsqrt(tl.sum(xf * xf, axis=1) / HEAD_DIM + eps)[:, None]
        norm_w = tl.load(norm_w_ptr + dims, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
        norm_w_rot = tl.load(norm_w_ptr + dims_rot, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    return _norm_rotate(x, x_rot, inv_rms, norm_w, norm_w_rot, cos, sin, sign, QK_NORM)


# Runtime-varying ints are not specialised: no JIT compile for new batch shapes.
@triton.jit(do_not_specialize=["num_splits", "stride_bt", "stride_qkv"])
def _fused_decode_kernel(
    qkv_ptr, pos_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr,
    slot_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, seq_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr, counter_ptr,
    scale_log2, eps, num_splits,
    stride_qkv, stride_cos, stride_out,
    stride_cache_block, stride_cache_slot, stride_cache_head, stride_bt,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr, MIN_TILES: tl.constexpr, QK_NORM: tl.constexpr,
    MERGE_ROWS: tl.constexpr, SPLITS_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr, FP8: tl.constexpr,
):  # fmt: skip
    if PDL:  # launched early (programmatic dependent launch): qkv is ready from here on
        gdc_wait()
        gdc_launch_dependents()
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    QUERIES_PER_KV: tl.constexpr = NUM_HEADS // NUM_KV_HEADS
    HALF: tl.constexpr = HEAD_DIM // 2

    group = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, DIM_PAD)
    dim_ok = dims < HEAD_DIM
    row_ok = group < QUERIES_PER_KV
    heads = kv_head * QUERIES_PER_KV + group
    io_mask = row_ok[:, None] & dim_ok[None, :]
    o_ptrs = out_ptr + seq.to(tl.int64) * stride_out + heads[:, None] * HEAD_DIM + dims[None, :]

    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - 1  # cached keys; the new token's key is this program's own
    num_tiles = tl.cdiv(context, TILE_N)
    used = tl.maximum(tl.minimum(num_splits, tl.cdiv(num_tiles, MIN_TILES)), 1)
    if (split >= used) | (seq_len <= 0):
        if (split == 0) & (seq_len <= 0):  # a zero-length sequence attends to nothing: 0
            tl.store(o_ptrs, tl.zeros([GROUP_PAD, DIM_PAD], tl.float32).to(
                out_ptr.dtype.element_ty), mask=io_mask)  # fmt: skip
        return
    tiles_per_split = tl.cdiv(num_tiles, used)
    tile_start = split * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, num_tiles)

    dims_rot = tl.where(dims < HALF, dims + HALF, dims - HALF)  # rotate_half's source dims
    sign = tl.where(dims < HALF, -1.0, 1.0)[None, :]
    pos = tl.load(pos_ptr + seq).to(tl.int64)
    cos = tl.load(cos_ptr + pos * stride_cos + dims, mask=dim_ok, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * stride_cos + dims, mask=dim_ok, other=0.0)[None, :]
    token = qkv_ptr + seq.to(tl.int64) * stride_qkv
    q = _load_heads(token, heads, row_ok, dims, dims_rot, dim_ok, eps, q_norm_ptr, cos, sin,
                    sign, HEAD_DIM, QK_NORM)  # fmt: skip

    row_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    row_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    if split == 0:
        one = tl.arange(0, 1)
        k_head = NUM_HEADS + kv_head + one
        k_new = _load_heads(token, k_head, one < 1, dims, dims_rot, dim_ok, eps, k_norm_ptr,
                            cos, sin, sign, HEAD_DIM, QK_NORM)  # fmt: skip
        v_new = tl.load(token + (NUM_HEADS + NUM_KV_HEADS + kv_head) * HEAD_DIM + dims,
                        mask=dim_ok, other=0.0)[None, :]  # fmt: skip
        slot = tl.load(slot_ptr + seq).to(tl.int64)
        dst = ((slot // BLOCK_SIZE) * stride_cache_block + (slot % BLOCK_SIZE) * stride_cache_slot
               + kv_head * stride_cache_head + dims[None, :])  # fmt: skip
        write = dim_ok[None, :] & (slot >= 0)  # slot -1: a padding row, nothing is stored
        k_stored = to_cache(k_new, k_cache_ptr, FP8)
        v_stored = to_cache(v_new, v_cache_ptr, FP8)
        tl.store(k_cache_ptr + dst, k_stored, mask=write)
        tl.store(v_cache_ptr + dst, v_stored, mask=write)
        if FP8:  # attend to the new key/value as stored, as every later step reads them
            k_new = k_stored.to(q.dtype)
            v_new = v_stored.to(q.dtype)
        # The new key as the first one seen: its score starts the running max.
        s = tl.sum(q.to(tl.float32) * k_new.to(tl.float32), axis=1) * scale_log2
        row_max = s
        row_sum = tl.full([GROUP_PAD], 1.0, tl.float32)
        acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32) + v_new.to(tl.float32)

    row_pos = tl.full([GROUP_PAD], 0, tl.int32) + context - 1
    table_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    row_max, row_sum, acc = attend_paged_tiles(
        q, row_max, row_sum, acc, k_cache_ptr, v_cache_ptr, table_row,
        kv_head * stride_cache_head, tile_start, tile_end, row_pos, context, scale_log2,
        stride_cache_block, stride_cache_slot, HEAD_DIM, DIM_PAD, BLOCK_SIZE, TILE_N, True,
        DOT_PRECISION,
    )  # fmt: skip

    if used == 1:
        tl.store(o_ptrs, (acc / row_sum[:, None]).to(out_ptr.dtype.element_ty), mask=io_mask)
        return
    # Several partitions: publish this one's (output, log-sum-exp), then count it in.
    # A partition left without tiles by the rounding of its share weighs nothing (lse -inf).
    filled = row_sum > 0
    safe_sum = tl.where(filled, row_sum, 1.0)
    part = (seq.to(tl.int64) * NUM_HEADS + heads) * num_splits + split
    lse = tl.where(filled, row_max + tl.log2(safe_sum), float("-inf"))
    tl.store(part_lse_ptr + part, lse, mask=row_ok)
    tl.store(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc / safe_sum[:, None],
             mask=io_mask)  # fmt: skip
    tl.debug_barrier()  # every thread's stores precede the release below
    counter = counter_ptr + seq * NUM_KV_HEADS + kv_head
    arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    if arrived == used - 1:  # the last partition merges; the others are done
        tl.store(counter, 0)  # ready for the next launch (or graph replay)
        _merge_partitions(part_out_ptr, part_lse_ptr, out_ptr, seq, kv_head, used, num_splits,
                          stride_out, NUM_HEADS, QUERIES_PER_KV, MERGE_ROWS, HEAD_DIM,
                          DIM_PAD, SPLITS_PAD)  # fmt: skip


@triton.jit
def _merge_partitions(part_out_ptr, part_lse_ptr, out_ptr, seq, kv_head, used, num_splits,
                      stride_out, NUM_HEADS: tl.constexpr, QUERIES_PER_KV: tl.constexpr,
                      ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
                      SPLITS_PAD: tl.constexpr):  # fmt: skip
    """One kv head's query heads: the partitions' outputs weighted by their log-sum-exp.

    Reads bypass L1 (`.cg`): the partials were written by other SMs during this launch.
    """
    CHUNK: tl.constexpr = 8  # partitions per load: [ROWS, CHUNK, DIM_PAD] in registers
    rows = tl.arange(0, ROWS)
    row_ok = rows < QUERIES_PER_KV
    heads = kv_head * QUERIES_PER_KV + rows
    dims = tl.arange(0, DIM_PAD)
    first = (seq.to(tl.int64) * NUM_HEADS + heads) * num_splits  # partition 0 of each head
    splits = tl.arange(0, SPLITS_PAD)
    lse = tl.load(part_lse_ptr + first[:, None] + splits[None, :],
                  mask=row_ok[:, None] & (splits < used)[None, :], other=float("-inf"),
                  cache_modifier=".cg")  # fmt: skip
    lse_max = tl.where(row_ok, tl.max(lse, axis=1), 0.0)
    total = tl.sum(tl.exp2(lse - lse_max[:, None]), axis=1)
    merged = tl.zeros([ROWS, DIM_PAD], tl.float32)
    for c in range(0, used, CHUNK):
        js = c + tl.arange(0, CHUNK)
        ok = row_ok[:, None] & (js < used)[None, :]
        lse_c = tl.load(part_lse_ptr + first[:, None] + js[None, :], mask=ok,
                        other=float("-inf"), cache_modifier=".cg")  # fmt: skip
        weight = tl.exp2(lse_c - lse_max[:, None])
        parts = tl.load(
            part_out_ptr + (first[:, None] + js[None, :])[:, :, None] * HEAD_DIM
            + dims[None, None, :],
            mask=ok[:, :, None] & (dims < HEAD_DIM)[None, None, :], other=0.0,
            cache_modifier=".cg",
        )  # fmt: skip
        merged += tl.sum(parts * weight[:, :, None], axis=1)
    result = merged / tl.where(row_ok, total, 1.0)[:, None]
    o_ptrs = out_ptr + seq.to(tl.int64) * stride_out + heads[:, None] * HEAD_DIM + dims[None, :]
    tl.store(o_ptrs, result.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (dims < HEAD_DIM)[None, :])  # fmt: skip


def _counter_buffer(device: torch.device, n: int) -> torch.Tensor:
    """Per-(sequence, kv head) arrival counters, zero between launches (kept by the kernel)."""
    buf = _counters.get(device)
    if buf is None or buf.numel() < n:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("fused decode attention: run the largest batch once before "
                               "capturing a CUDA graph (its counters are allocated then)")  # fmt: skip
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _counters[device] = buf
    return buf


def fused_decode_attention(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    num_heads: int,
    scale: float,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    eps: float = 1e-6,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """Decode attention of one token per sequence from its fused `qkv` [B, (Hq + 2 Hkv) D].

    Normalises q and k per head (`q_norm`/`k_norm` weights, Qwen3), rotates them at
    `positions` with `RotaryEmbedding`'s tables, writes the new key/value at `slot_mapping`
    (-1: skip), and attends over the sequence's `seq_lens[i]` keys, the new one included.
    Returns [B, Hq * D]. `config` overrides the tile shape and the partition count.
    """
    check_cache_pair(k_cache, v_cache)
    check_batch(seq_lens, block_table)
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    num_seqs = seq_lens.shape[0]
    width = (num_heads + 2 * num_kv_heads) * head_dim
    if num_heads % num_kv_heads or head_dim % 2:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of the cache's "
                         f"{num_kv_heads} kv heads, and head_dim ({head_dim}) even")  # fmt: skip
    fp8 = k_cache.dtype == torch.float8_e4m3fn  # --kv-cache-dtype fp8: any query dtype
    if qkv.shape != (num_seqs, width) or (qkv.dtype != k_cache.dtype and not fp8) or (
            qkv.stride(1) != 1):  # fmt: skip
        raise ValueError(f"qkv must be [{num_seqs}, {width}] {k_cache.dtype} with contiguous "
                         f"rows, got {tuple(qkv.shape)} {qkv.dtype}")  # fmt: skip
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping)):
        if t.shape != (num_seqs,) or t.dtype != torch.int64:
            raise ValueError(f"{name} must be a [{num_seqs}] int64 tensor, got "
                             f"{tuple(t.shape)} {t.dtype}")  # fmt: skip
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != head_dim or (
            cos.stride() != sin.stride() or cos.stride(1) != 1):  # fmt: skip
        raise ValueError(f"cos and sin must be [max_positions, {head_dim}] tables with equal "
                         f"strides, got {tuple(cos.shape)} and {tuple(sin.shape)}")  # fmt: skip
    if (q_norm is None) != (k_norm is None):
        raise ValueError("q_norm and k_norm come together (per-head q/k RMSNorm)")
    out = torch.empty(num_seqs, num_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    if num_seqs == 0:
        return out
    cfg = config or default_decode_config(head_dim, qkv.dtype)
    num_splits = cfg.num_splits or choose_num_splits(num_seqs, num_kv_heads, block_table.shape[1] * block_size,
                                   cfg.tile_n, num_sms(qkv.device))  # fmt: skip
    queries_per_kv = num_heads // num_kv_heads
    if num_splits > 1:
        part_out = torch.empty(num_seqs * num_heads * num_splits * head_dim,
                               dtype=torch.float32, device=qkv.device)  # fmt: skip
        part_lse = torch.empty(num_seqs * num_heads * num_splits, dtype=torch.float32,
                               device=qkv.device)  # fmt: skip
        counters = _counter_buffer(qkv.device, num_seqs * num_kv_heads)
    else:
        part_out = part_lse = counters = out  # unused: one partition stores its output
    _fused_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        qkv, positions, cos, sin, q_norm if q_norm is not None else cos,
        k_norm if k_norm is not None else cos,
        slot_mapping, k_cache, v_cache, block_table, seq_lens,
        out, part_out, part_lse, counters,
        scale * math.log2(math.e), eps, num_splits,
        qkv.stride(0), cos.stride(0), out.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
        GROUP_PAD=max(16, triton.next_power_of_2(queries_per_kv)),
        HEAD_DIM=head_dim, DIM_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=block_size,
        TILE_N=cfg.tile_n, MIN_TILES=_MIN_TILES, QK_NORM=q_norm is not None,
        MERGE_ROWS=triton.next_power_of_2(queries_per_kv),
        # One compiled variant whatever the partition count (no compile per graph bucket).
        SPLITS_PAD=triton.next_power_of_2(MAX_SPLITS),
        DOT_PRECISION=dot_precision(qkv.dtype), PDL=supports_pdl(qkv.device), FP8=fp8,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=supports_pdl(qkv.device),
        # Rotary must round each product (see triton/layers.py, rotary_embedding).
        enable_fp_fusion=False,
    )  # fmt: skip
    return out
