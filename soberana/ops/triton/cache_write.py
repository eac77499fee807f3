"""Triton kernel that writes new keys and values into the paged KV cache by slot."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from soberana.ops.triton.checks import check_cache_pair

# float8_e4m3fn's largest finite value: FP8 caches saturate there (attention.to_kv_cache_dtype).
# A constexpr: compiled Triton (unlike its interpreter) refuses other globals in a kernel.
FP8_MAX = tl.constexpr(448.0)


@triton.jit
def round_to_e4m3(x):
    """float32 `x` (|x| <= 448) rounded to the nearest float8_e4m3fn value, ties to even, in
    float32 arithmetic: the cast that follows is then exact. (The GPU's cvt rounds the same
    way; Triton 3.6's interpreter drops the carry into the next power of two, -31.6 -> -16.)"""
    bits = x.to(tl.int32, bitcast=True)
    exp = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # below 2^-6: subnormals, step 2^-9
    step = ((exp + 124) << 23).to(tl.float32, bitcast=True)  # 2^(exp - 3): 3 mantissa bits
    # Times 2^(3 - exp), not divided by `step`: compiled Triton divides float32 approximately
    # (div.full.f32), a product by a power of two is exact.
    y = tl.abs(x) * ((130 - exp) << 23).to(tl.float32, bitcast=True)  # < 16
    r = tl.floor(y + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    r = tl.where(((r - y) == 0.5) & odd, r - 1.0, r) * step
    # The sign bit put back as a bit: Triton negates as 0 - r, which turns -0.0 into +0.0
    # (torch's cast keeps it: a small negative value is stored as -0.0).
    sign = (bits >> 31) << 31
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def to_cache(x, cache_ptr, FP8: tl.constexpr):
    """`x` as the cache stores it: for an FP8 cache widened to float32, saturated at +-448
    and rounded once (as `to_kv_cache_dtype` does on CPUs); otherwise cast to the cache dtype."""
    if FP8:
        x = round_to_e4m3(tl.clamp(x.to(tl.float32), -FP8_MAX, FP8_MAX))
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    num_kv_heads,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    FP8: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, DIM_PAD)[None, :]
    # slot -1 marks a token with no cache slot (padding): it is skipped by masking
    # every access, so the program does no memory traffic at all.
    mask = (heads < num_kv_heads) & (dims < HEAD_DIM) & (slot >= 0)
    dst = (
        (slot // BLOCK_SIZE) * stride_cache_block
        + (slot % BLOCK_SIZE) * stride_cache_slot
        + heads * stride_cache_head
        + dims
    )
    k = tl.load(key_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
    tl.store(k_cache_ptr + dst, to_cache(k, k_cache_ptr, FP8), mask=mask)
    v = tl.load(value_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
    tl.store(v_cache_ptr + dst, to_cache(v, v_cache_ptr, FP8), mask=mask)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write `key`/`value` `[num_tokens, num_kv_heads, head_dim]` at `slot_mapping` (-1: skip)."""
    check_cache_pair(k_cache, v_cache)
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    for name, t in (("key", key), ("value", value)):
        if t.dim() != 3 or tuple(t.shape[1:]) != (num_kv_heads, head_dim):
            raise ValueError(
                f"{name} must be [num_tokens, {num_kv_heads}, {head_dim}] to match the cache, "
                f"got {tuple(t.shape)}"
            )
        if t.stride(2) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim, got strides {t.stride()}")
    if slot_mapping.dtype != torch.int64 or slot_mapping.dim() != 1:
        raise ValueError(f"slot_mapping must be a 1-D int64 tensor, got {slot_mapping.dtype}")
    num_tokens = slot_mapping.shape[0]
    if key.shape[0] < num_tokens or value.shape[0] < num_tokens:
        raise ValueError(
            f"slot_mapping has {num_tokens} slots but key/value have "
            f"{key.shape[0]}/{value.shape[0]} tokens"
        )
    if num_tokens == 0:
        return
    _reshape_and_cache_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        num_kv_heads,
        HEAD_DIM=head_dim,
        DIM_PAD=triton.next_power_of_2(head_dim),
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        BLOCK_SIZE=block_size,
        FP8=k_cache.dtype == torch.float8_e4m3fn,
        num_warps=4,
    )
