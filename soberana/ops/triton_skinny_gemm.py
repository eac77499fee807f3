"""Skinny GEMM for decode batches: `x [M, K] @ W[N, K].T` for M <= 16, with the neighbouring
elementwise work fused in, so a decode layer is five launches instead of thirteen.

At batch 1 a decode step is a stream of weights through the matrix units; what costs time
around the matmuls is the small kernels between them (RMSNorm, SiLU-and-mul, cuBLAS's split-K
reduction) and the gaps between launches. Here
- the **prologue** can apply the layer's (residual add +) RMSNorm to `x`: every program reads
  the few input rows (a few KB, from L2) as it streams W, multiplies them by the norm's weight
  and scales its accumulator by each row's 1 / rms at the end, so no norm kernel runs;
  program 0 also writes the new residual stream;
- the **epilogue** can add a bias, or apply SiLU-and-mul to a fused gate/up projection: a
  program computes the same rows of the gate half and the up half and writes only
  `silu(gate) * up`.
Each program owns `BLOCK_N` whole output columns (no split-K), so results are deterministic
and independent of how many programs run. Rounding follows the unfused chain where it can:
the residual sum, the projection and the activation are rounded to the tensor dtype where
`soberana/ops/layers.py` rounds them. The normed input is not: the GEMM reads
`x * norm_weight` rounded once and applies 1 / rms in float32 afterwards, where the eager
chain rounds `x / rms` and then its product with the weight (the same value to within a
rounding of the input, one pass over it instead of two).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from soberana.ops.triton_paged_tile import dot_precision

MAX_M = 16  # rows: the decode batches this kernel is for; larger batches use cuBLAS


@dataclass(frozen=True)
class SkinnyConfig:
    """Launch parameters: output columns and reduction width per iteration of a program.

    With `dot` the rows go through the matrix units as one 16-row tile whatever M is, so a
    row's result does not depend on the other rows; without it a single row is reduced on the
    CUDA cores (M = 1 only; faster there, summed in another order).
    """

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    dot: bool = True


def default_config(m: int, gated: bool) -> SkinnyConfig:
    """Tile shapes measured on an H200 at Llama-3.1-8B's projections
    (benchmarks/gpu/decode_kernels.py --sweep): many narrow programs, each streaming 8-16
    rows of W in 512-wide slices, for one row; 16-row matrix-unit tiles for more."""
    if m == 1:
        return SkinnyConfig(16 if gated else 8, 512, 4, 1 if gated else 2, dot=False)
    return SkinnyConfig(16 if gated else 32, 256, 4, 5)


@triton.jit
def _load_input(x_ptr, res_ptr, rows, ks, mask, stride_xm, stride_rm,
                HAS_RESIDUAL: tl.constexpr):  # fmt: skip
    """Rows of `x` (+ `residual`, rounded to the dtype as the eager `x + residual` is)."""
    x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows[:, None] * stride_rm + ks[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
    return x


@triton.jit(do_not_specialize=["M"])  # every decode batch size shares one compiled variant
def _skinny_gemm_kernel(
    x_ptr, res_ptr, norm_w_ptr, w_ptr, bias_ptr, out_ptr, res_out_ptr,
    M, N, K, eps,
    stride_xm, stride_rm, stride_wn, stride_om, stride_rom,
    NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = tl.arange(0, M_PAD)
    row_ok = rows < M
    cols = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w_rows = w_ptr + cols[:, None] * stride_wn

    # One row (M_PAD == 1) accumulates products elementwise and reduces once at the end;
    # several rows go through the matrix units as one 16-row tile.
    if M_PAD == 1:
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    else:
        acc = tl.zeros([M_PAD, BLOCK_N], tl.float32)
        acc_up = tl.zeros([M_PAD, BLOCK_N], tl.float32)
    # Squares build up elementwise and are summed once at the end: a reduction across the
    # program's threads in every iteration would stall the stream of weight loads.
    sum_sq = tl.zeros([M_PAD, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        mask = row_ok[:, None] & k_ok[None, :]
        x = _load_input(x_ptr, res_ptr, rows, ks, mask, stride_xm, stride_rm, HAS_RESIDUAL)
        if NORM:
            if HAS_RESIDUAL:
                # The new residual stream, written once.
                tl.store(res_out_ptr + rows[:, None] * stride_rom + ks[None, :], x,
                         mask=mask & (pid == 0))  # fmt: skip
            # RMSNorm's 1 / rms is one factor per row: the sum of squares builds up here and
            # the factor scales the accumulator at the end, so the input is read in one pass.
            xf = x.to(tl.float32)
            sum_sq += xf * xf
            g = tl.load(norm_w_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            x = (xf * g[None, :]).to(x.dtype)
        w_mask = col_ok[:, None] & k_ok[None, :]
        w = tl.load(w_rows + ks[None, :], mask=w_mask, other=0.0)
        if GATED:
            # The up half's rows sit N rows below the gate half's.
            w_up = tl.load(w_rows + N * stride_wn + ks[None, :], mask=w_mask, other=0.0)
        if M_PAD == 1:
            acc += w.to(tl.float32) * x.to(tl.float32)
            if GATED:
                acc_up += w_up.to(tl.float32) * x.to(tl.float32)
        else:
            acc += tl.dot(x.to(w.dtype), tl.trans(w), input_precision=DOT_PRECISION)
            if GATED:
                acc_up += tl.dot(x.to(w.dtype), tl.trans(w_up), input_precision=DOT_PRECISION)

    if M_PAD == 1:
        acc = tl.sum(acc, axis=1)[None, :]
        acc_up = tl.sum(acc_up, axis=1)[None, :]
    if NORM:
        inv_rms = tl.math.rsqrt(tl.sum(sum_sq, axis=1) / K + eps)[:, None]
        acc = acc * inv_rms
        acc_up = acc_up * inv_rms
    out_dtype = out_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(bias_ptr + N + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        # silu(gate) * up with the gate, the up projection and the SiLU each rounded to the
        # dtype, as `F.silu(gate).mul_(up)` on the projection's output rounds them.
        gate = acc.to(out_dtype).to(tl.float32)
        up = acc_up.to(out_dtype).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(out_dtype).to(tl.float32)
        acc = act * up
    o_mask = row_ok[:, None] & col_ok[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_dtype), mask=o_mask)


def skinny_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    gated: bool = False,
    config: SkinnyConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`x @ weight.T (+ bias)` for `x` [M, K] with M <= 16; returns (out, new residual).

    With `norm_weight`, `x` is first replaced by `RMSNorm(x (+ residual)) * norm_weight`; the
    second result is then `x + residual` (or `x` itself without a residual), else None.
    With `gated`, `weight` is a fused [2I, K] gate/up projection and out is
    `silu(gate) * up` [M, I].
    """
    _check(x, weight, bias, norm_weight, residual, gated)
    m, k = x.shape
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    new_residual = None
    if norm_weight is not None:
        new_residual = x if residual is None else torch.empty_like(x)
    if m == 0:
        return out, new_residual
    cfg = config or default_config(m, gated)
    m_pad = 1 if m == 1 and not cfg.dot else 16
    res = residual if residual is not None else x
    res_out = new_residual if residual is not None else out  # unused without a residual
    _skinny_gemm_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, res, norm_weight if norm_weight is not None else weight, weight,
        bias if bias is not None else weight, out, res_out,
        m, n, k, eps,
        x.stride(0), res.stride(0), weight.stride(0), out.stride(0), res_out.stride(0),
        NORM=norm_weight is not None, HAS_RESIDUAL=residual is not None,
        HAS_BIAS=bias is not None, GATED=gated, M_PAD=m_pad,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, DOT_PRECISION=dot_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out, new_residual


def _check(x, weight, bias, norm_weight, residual, gated) -> None:
    if x.dim() != 2 or not 0 <= x.shape[0] <= MAX_M:
        raise ValueError(f"x must be [M, K] with M <= {MAX_M}, got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.stride(1) != 1:
        raise ValueError(f"weight must be a row-major [N, {x.shape[1]}] tensor, got "
                         f"{tuple(weight.shape)} with strides {weight.stride()}")  # fmt: skip
    if gated and weight.shape[0] % 2:
        raise ValueError(f"a gated weight stacks gate and up rows: got {weight.shape[0]} rows")
    if x.dtype != weight.dtype or x.device != weight.device:
        raise ValueError(f"x ({x.dtype} on {x.device}) and weight ({weight.dtype} on "
                         f"{weight.device}) must match")  # fmt: skip
    if x.numel() and x.stride(1) != 1:
        raise ValueError(f"x must be contiguous in its last dim, got strides {x.stride()}")
    for name, t, size in (("bias", bias, weight.shape[0]), ("norm_weight", norm_weight,
                                                            x.shape[1])):  # fmt: skip
        if t is not None and (t.shape != (size,) or t.stride(0) != 1 or t.device != x.device):
            raise ValueError(f"{name} must be a contiguous [{size}] tensor on {x.device}, "
                             f"got {tuple(t.shape)}")  # fmt: skip
    if residual is not None:
        if norm_weight is None:
            raise ValueError("residual is added before the norm: pass norm_weight with it")
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(1) != 1:
            raise ValueError(f"residual must be a {tuple(x.shape)} {x.dtype} tensor contiguous "
                             f"in its last dim, got {tuple(residual.shape)} {residual.dtype}")  # fmt: skip
