"""Batched GEMM over quantized weights: `x [M, K] @ dequant(W).T`, W int8 (per-row scale) or
int4 (two per byte, group-wise scale and zero point), dequantized in registers tile by tile.

Each program computes a BLOCK_M x BLOCK_N tile of the output. A tile of W is loaded in its
stored width (1 or 1/2 byte per weight: the HBM traffic the quantization saves), widened to
the activation dtype and fed to `tl.dot`. int8 values are exact in bfloat16 and float16, so
the int8 products are exact and its per-row scale is applied once to the float32 sum; int4
groups are dequantized to the activation dtype first ((q - zero) * scale, rounded once), as
the weight-only reference `x @ dequant(W).T` in that dtype rounds it. Ragged M and N are
masked; int4 needs K to be a multiple of its group (checked at load).

int8 W8A8 (`int8_w8a8_matmul`, batched steps of `--quantization int8`): the activations are
quantized per token with one scale per group of inputs (`per_token_quant`); each group's
int8 products are summed exactly in int32 by `tl.dot` on the int8 tensor cores, then scaled
by the group's activation scale into a float32 sum, times the weight's per-channel scale.
(`torch._int_mm` cannot do this: it sums the whole row in int32, so one activation scale
per row, which costs SmolLM2 +3.9% perplexity against +0.73% per group of 128.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from soberana.ops.triton.per_token_quant import per_token_quant


@triton.jit
def _quant_matmul_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K, stride_xm, stride_wn, stride_sn, stride_om,
    INT4: tl.constexpr, GROUP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
        if INT4:
            # BLOCK_K divides GROUP: the whole tile shares one scale and zero per row
            rh = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(w_ptr + rn[:, None] * stride_wn + rh[None, :],
                             mask=n_ok[:, None], other=0)  # fmt: skip
            q = tl.interleave(packed & 0xF, packed >> 4).to(tl.float32)
            g = k0 // GROUP
            s = tl.load(s_ptr + rn * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + rn * stride_sn + g, mask=n_ok, other=0).to(tl.float32)
            w = ((q - z[:, None]) * s[:, None]).to(x.dtype)
        else:
            w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :],
                        mask=n_ok[:, None] & k_ok[None, :], other=0).to(x.dtype)  # fmt: skip
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    if not INT4:
        acc *= tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])  # fmt: skip


def _blocks(m: int) -> tuple[int, int, int]:
    # small M (decode batches) wants narrow row tiles; tl.dot needs at least 16
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    return block_m, 64, 64


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x [M, K] @ (weight int8 [N, K] * scale[:, None]).T` in x's dtype."""
    _check(x, weight, scale, torch.int8, x.shape[1])
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bm, bn, bk = _blocks(m)
    _quant_matmul_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        x, weight, scale, scale, out, m, n, k, x.stride(0), weight.stride(0), 0, out.stride(0),
        INT4=False, GROUP=1, IEEE=x.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    )  # fmt: skip
    return out


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                zero: torch.Tensor, group_size: int) -> torch.Tensor:  # fmt: skip
    """`x [M, K] @ dequant(packed uint8 [N, K/2], scale, zero [N, K/g]).T` in x's dtype."""
    _check(x, packed, scale, torch.uint8, x.shape[1] // 2)
    m, k = x.shape
    n = packed.shape[0]
    if group_size % 16 or k % group_size or scale.shape != (n, k // group_size):
        raise ValueError(f"int4_matmul: group_size must be a multiple of 16 dividing K={k}, "
                         f"with scale/zero [N, K/g]; got group {group_size}, scale "
                         f"{tuple(scale.shape)}")  # fmt: skip
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bm, bn, bk = _blocks(m)
    bk = min(bk, group_size)  # a K tile never straddles two groups
    _quant_matmul_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        x, packed, scale, zero, out, m, n, k, x.stride(0), packed.stride(0), scale.stride(0),
        out.stride(0), INT4=True, GROUP=group_size, IEEE=x.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    )  # fmt: skip
    return out


@triton.jit
def _w8a8_int8_kernel(
    xq_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_sm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SWIZZLE: tl.constexpr,
):  # fmt: skip
    # SWIZZLE row tiles share each column of programs, so a tile of W is read from HBM once
    # for them and from L2 after
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = (pid // (SWIZZLE * num_n)) * SWIZZLE
    rows_here = tl.minimum(num_m - first_m, SWIZZLE)
    pid_m = first_m + (pid % (SWIZZLE * num_n)) % rows_here
    pid_n = (pid % (SWIZZLE * num_n)) // rows_here
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    rk = tl.arange(0, GROUP)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for g in range(0, K // GROUP):
        a = tl.load(xq_ptr + rm[:, None] * stride_xm + g * GROUP + rk[None, :],
                    mask=m_ok[:, None], other=0)  # fmt: skip
        w = tl.load(w_ptr + rn[:, None] * stride_wn + g * GROUP + rk[None, :],
                    mask=n_ok[:, None], other=0)  # fmt: skip
        s = tl.load(xs_ptr + rm * stride_sm + g, mask=m_ok, other=0.0)
        acc += tl.dot(a, tl.trans(w), out_dtype=tl.int32).to(tl.float32) * s[:, None]
    acc *= tl.load(ws_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])  # fmt: skip


def _w8a8_blocks(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): narrow row tiles for small batches (more
    programs over N), 128 x 128 for large ones. Not yet tuned on a GPU."""
    if m <= 16:
        return 16, 64, 4, 4
    if m <= 64:
        return 64, 128, 4, 4
    return 128, 128, 8, 3


def int8_w8a8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, group: int,
                     bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """`x [M, K] @ (weight int8 [N, K] * scale[:, None]).T + bias` in x's dtype, with x
    quantized to int8 per token, one scale per `group` inputs (a multiple of 16 dividing K):
    sum over groups of (xq_g @ weight_g.T, exact in int32) * x_scale_g, times scale, + bias."""
    _check(x, weight, scale, torch.int8, x.shape[1])
    m, k = x.shape
    n = weight.shape[0]
    if group % 16 or k % group:
        raise ValueError(f"int8_w8a8_matmul: group must be a multiple of 16 dividing K={k}; "
                         f"got {group}")  # fmt: skip
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{n}] tensor; got {tuple(bias.shape)}")
    xq, x_scale = per_token_quant(x, torch.int8, group)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bm, bn, warps, stages = _w8a8_blocks(m)
    _w8a8_int8_kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](
        xq, x_scale, weight, scale, scale if bias is None else bias, out,
        m, n, k, xq.stride(0), x_scale.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, GROUP=group, BLOCK_M=bm, BLOCK_N=bn, SWIZZLE=8,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def _check(x, weight, scale, wdtype, wcols) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be a [M, K] tensor contiguous in K; got {tuple(x.shape)}")
    if weight.dtype != wdtype or weight.dim() != 2 or weight.shape[1] != wcols or (
            weight.stride(1) != 1):  # fmt: skip
        raise ValueError(f"weight must be a row-major {wdtype} [N, {wcols}] tensor; got "
                         f"{weight.dtype} {tuple(weight.shape)}")  # fmt: skip
    if scale.shape[0] != weight.shape[0] or not scale.is_contiguous():
        raise ValueError(f"scale must be contiguous with {weight.shape[0]} rows; got "
                         f"{tuple(scale.shape)}")  # fmt: skip
