"""Inputs and references for the decode fast-path kernels (fused GEMV, fused decode
attention), shared by the interpreter tests here and the GPU tests in tests/gpu."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from soberana.ops.attention import to_kv_cache_dtype
from soberana.ops.layers import torch_rms_norm, torch_rotary_embedding, torch_silu_and_mul
from tests.ops.fused_cases import randn, rope_tables
from tests.ops.paged_attention_cases import make_step, reference_attention, with_fp8_cache


def reference_gemv(x, weight, bias=None, *, norm_weight=None, eps=1e-6, residual=None,
                   gated=False):  # fmt: skip
    """The unfused eager chain: (add +) RMSNorm, linear, SiLU-and-mul; (out, new residual)."""
    new_residual = None
    if norm_weight is not None:
        new_residual = x if residual is None else x + residual
        x = torch_rms_norm(new_residual, norm_weight, eps)
    # Linear in float32 from the rounded inputs, rounded once, as a GEMM with a float32
    # accumulator (and bias epilogue) does.
    out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    out = out.to(x.dtype)
    if gated:
        out = torch_silu_and_mul(out)
    return out, new_residual


@dataclass
class FusedDecodeCase:
    """A decode step as the fused kernel sees it, and what the unfused chain gives."""

    qkv: torch.Tensor  # [B, (Hq + 2 Hkv) D]
    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    slot_mapping: torch.Tensor
    k_cache: torch.Tensor  # the new tokens' slots hold NaN until the kernel writes them
    v_cache: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    num_heads: int
    scale: float
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    ref_out: torch.Tensor  # float32 [B, Hq * D]
    ref_k: torch.Tensor  # real rows' rotated new keys [rows, Hkv, D], rounded as eagerly
    ref_v: torch.Tensor


def make_fused_decode_case(context_lens, *, num_heads, num_kv_heads, head_dim, block_size,
                           dtype, device, gen, qk_norm=False, eps=1e-6,
                           kv_fp8=False):  # fmt: skip
    """Sequence i has `context_lens[i]` keys, its last one new (0: a padding row). With
    `kv_fp8` the cache is float8_e4m3fn and the reference reads every key/value, the new one
    too, rounded as that cache stores it."""
    step = make_step(context_lens, [1] * len(context_lens), num_heads=num_heads,
                     num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
                     dtype=dtype, device=device, generator=gen)  # fmt: skip
    b = len(context_lens)
    q_raw = randn(b, num_heads, head_dim, dtype=dtype, device=device, gen=gen)
    k_raw = randn(b, num_kv_heads, head_dim, dtype=dtype, device=device, gen=gen)
    v_new = randn(b, num_kv_heads, head_dim, dtype=dtype, device=device, gen=gen)
    q_norm = k_norm = None
    q_in, k_in = q_raw, k_raw
    if qk_norm:
        q_norm = randn(head_dim, dtype=dtype, device=device, gen=gen)
        k_norm = randn(head_dim, dtype=dtype, device=device, gen=gen)
        q_in, k_in = torch_rms_norm(q_raw, q_norm, eps), torch_rms_norm(k_raw, k_norm, eps)
    positions = torch.tensor([max(c - 1, 0) for c in context_lens], dtype=torch.int64,
                             device=device)  # fmt: skip
    cos, sin = rope_tables(head_dim, max(context_lens) + 8, device)
    q_rot, k_rot = torch_rotary_embedding(positions, q_in, k_in, cos, sin)
    # The reference sees the rotated new key/value as each context's last one.
    for i, c in enumerate(context_lens):
        if c:
            step.keys[i][-1] = k_rot[i]
            step.values[i][-1] = v_new[i]
    step.q = q_rot
    slots = step.slot_mapping
    heads = (-1, num_kv_heads, head_dim)
    for cache in (step.k_cache, step.v_cache):
        cache.view(heads)[slots[slots >= 0]] = float("nan")
    ref_k, ref_v = k_rot, v_new
    if kv_fp8:
        step = with_fp8_cache(step)
        ref_k, ref_v = (to_kv_cache_dtype(t, torch.float8_e4m3fn) for t in (k_rot, v_new))
    ref = reference_attention(step).reshape(b, -1)
    qkv = torch.cat([q_raw.reshape(b, -1), k_raw.reshape(b, -1), v_new.reshape(b, -1)], dim=1)
    real = slots >= 0
    return FusedDecodeCase(qkv, positions, cos, sin, slots, step.k_cache, step.v_cache,
                           step.seq_lens, step.block_table, num_heads, step.scale, q_norm,
                           k_norm, ref, ref_k[real], ref_v[real])  # fmt: skip


def written_slots(case: FusedDecodeCase) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernel stored at each real row's slot: (keys, values) [rows, Hkv, D]."""
    shape = (-1, *case.k_cache.shape[2:])
    slots = case.slot_mapping[case.slot_mapping >= 0]
    return case.k_cache.view(shape)[slots], case.v_cache.view(shape)[slots]
