"""Triton kernels for the elementwise parts of a decoder layer: RMSNorm (with the residual add
fused in), rotary embedding and SiLU-and-mul, one launch each.

Each kernel computes in float32 and rounds to the tensor dtype at the same points as the
eager PyTorch chain in `soberana/ops/layers.py` (and `transformers`): rotary and the residual
sum match it bit for bit, RMSNorm and SiLU up to the order of a float32 sum or exp. Outputs may be passed in (`out=...`, also the input
itself for in-place use); nothing here syncs with the host or sizes memory from data, so
every op can be captured in a CUDA graph. Zero tokens launch nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# RMSNorm programs hold about this many elements (whole rows: the sum needs all of one row).
_NORM_TILE = 4096
_SILU_BLOCK = 1024


@triton.jit(do_not_specialize=["num_rows"])  # any batch size, one compiled variant
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    num_rows, heads, n_cols, eps,
    stride_xt, stride_xh, stride_rt, stride_rh,
    stride_ot, stride_oh, stride_rot, stride_roh,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    # Row r of a [T, H, N] view is (token r // H, head r % H); a [T, N] tensor has H = 1.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    t, h = rows // heads, rows % heads
    mask = (rows < num_rows) & (cols < n_cols)
    x = tl.load(x_ptr + t * stride_xt + h * stride_xh + cols, mask=mask, other=0.0)
    in_dtype = x.dtype
    x = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + t * stride_rt + h * stride_rh + cols, mask=mask, other=0.0)
        # The sum is rounded to the input dtype before the norm reads it, as `x + residual`
        # in the eager chain is.
        summed = (x + r.to(tl.float32)).to(in_dtype)
        tl.store(res_out_ptr + t * stride_rot + h * stride_roh + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    mean_sq = tl.sum(x * x, axis=1)[:, None] / n_cols
    normed = (x * tl.math.rsqrt(mean_sq + eps)).to(in_dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    out = (normed * w).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + cols, out, mask=mask)


def _rows(t: torch.Tensor) -> tuple[int, int]:
    """(token stride, head stride) of a [T, N] or [T, H, N] tensor; heads of [T, N] are 1."""
    return (t.stride(0), t.stride(1)) if t.dim() == 3 else (t.stride(0), 0)


def _check_rows(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.shape != like.shape or t.device != like.device:
        raise ValueError(
            f"{name} must have shape {tuple(like.shape)} on {like.device}, "
            f"got {tuple(t.shape)} on {t.device}"
        )
    if t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")


def _check_norm_args(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be [T, N] or [T, H, N], got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES or weight.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"x and weight must be one of {FLOAT_DTYPES}, got {x.dtype} and {weight.dtype}"
        )
    if weight.shape != x.shape[-1:] or weight.stride(0) != 1 or weight.device != x.device:
        raise ValueError(
            f"weight must be a contiguous [{x.shape[-1]}] tensor on {x.device}, "
            f"got {tuple(weight.shape)} on {weight.device}"
        )
    _check_rows("x", x, x)


def _norm_out(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """The output tensor: `out`, checked, or a new one; `weight * x` promotes as in torch."""
    dtype = torch.promote_types(x.dtype, weight.dtype)
    if out is None:
        return torch.empty(x.shape, dtype=dtype, device=x.device)
    _check_rows("out", out, x)
    if out.dtype != dtype:
        raise ValueError(f"out dtype must be {dtype}, got {out.dtype}")
    return out


def _launch_norm(x, residual, weight, eps, out, residual_out) -> None:
    n_cols = x.shape[-1]
    num_rows = x.numel() // n_cols
    if num_rows == 0:
        return
    block_n = triton.next_power_of_2(n_cols)
    rows = max(1, min(16, _NORM_TILE // block_n))  # small rows (per-head norms): many per program
    has_res = residual is not None
    res, res_out = (residual, residual_out) if has_res else (x, out)  # unused when not has_res
    _rms_norm_kernel[(triton.cdiv(num_rows, rows),)](
        x, res, weight, out, res_out,
        num_rows, x.shape[1] if x.dim() == 3 else 1, n_cols, eps,
        *_rows(x), *_rows(res), *_rows(out), *_rows(res_out),
        HAS_RESIDUAL=has_res, BLOCK_N=block_n, ROWS=rows,
        num_warps=min(8, max(1, rows * block_n // 512)),
    )  # fmt: skip


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSNorm of `x` [T, N] or [T, H, N] over its last dim, times `weight` [N]."""
    _check_norm_args(x, weight)
    out = _norm_out(x, weight, out)
    _launch_norm(x, None, weight, eps, out, None)
    return out


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) * weight, x + residual) in one pass over the rows."""
    _check_norm_args(x, weight)
    _check_rows("residual", residual, x)
    if residual.dtype != x.dtype:
        raise ValueError(f"residual dtype {residual.dtype} must equal x dtype {x.dtype}")
    out = _norm_out(x, weight, out)
    if residual_out is None:
        residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _check_rows("residual_out", residual_out, x)
    if residual_out.dtype != x.dtype:
        raise ValueError(f"residual_out dtype {residual_out.dtype} must equal x dtype {x.dtype}")
    _launch_norm(x, residual, weight, eps, out, residual_out)
    return out, residual_out


@triton.jit
def _rotate_heads(src, dst, stride_src, stride_dst, num_heads, cos, sin,
                  HALF: tl.constexpr, HALF_PAD: tl.constexpr, HEADS_PAD: tl.constexpr):  # fmt: skip
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < num_heads) & (d < HALF)
    x1 = tl.load(src + h * stride_src + d, mask=mask, other=0.0)
    x2 = tl.load(src + h * stride_src + HALF + d, mask=mask, other=0.0)
    dtype = x1.dtype
    # The eager chain `x * cos + rotate_half(x) * sin` runs in the tensor dtype: the tables
    # are cast to it and each product and the sum are rounded to it. Rounding at the same
    # points reproduces it (and transformers) exactly.
    c = cos.to(dtype).to(tl.float32)
    s = sin.to(dtype).to(tl.float32)
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    o1 = (x1 * c).to(dtype).to(tl.float32) - (x2 * s).to(dtype).to(tl.float32)
    o2 = (x2 * c).to(dtype).to(tl.float32) + (x1 * s).to(dtype).to(tl.float32)
    tl.store(dst + h * stride_dst + d, o1.to(dtype), mask=mask)
    tl.store(dst + h * stride_dst + HALF + d, o2.to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr, q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
    num_q_heads, num_kv_heads,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh, stride_cos, stride_sin,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, QH_PAD: tl.constexpr, KH_PAD: tl.constexpr,
):  # fmt: skip
    # One program per token: q and k share its cos/sin row. Both halves of a table row are
    # equal, so the first half is all that is read.
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, HALF_PAD)[None, :]
    cos = tl.load(cos_ptr + pos * stride_cos + d, mask=d < HALF, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_sin + d, mask=d < HALF, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + t * stride_qt, q_out_ptr + t * stride_qot, stride_qh, stride_qoh,
                  num_q_heads, cos, sin, HALF, HALF_PAD, QH_PAD)  # fmt: skip
    _rotate_heads(k_ptr + t * stride_kt, k_out_ptr + t * stride_kot, stride_kh, stride_koh,
                  num_kv_heads, cos, sin, HALF, HALF_PAD, KH_PAD)  # fmt: skip


def _check_heads(name: str, t: torch.Tensor, num_tokens: int, head_dim: int, dtype, device):
    if t.dim() != 3 or t.shape[0] != num_tokens or t.shape[2] != head_dim:
        raise ValueError(
            f"{name} must be [{num_tokens}, heads, {head_dim}], got shape {tuple(t.shape)}"
        )
    if t.dtype != dtype or t.device != device:
        raise ValueError(f"{name} must be {dtype} on {device}, got {t.dtype} on {t.device}")
    if t.numel() and t.stride(2) != 1:
        raise ValueError(f"{name} must be contiguous in head_dim, got strides {t.stride()}")


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_out: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embedding of q [T, Hq, D] and k [T, Hkv, D] at `positions` [T].

    `cos`/`sin` are `RotaryEmbedding`'s [max_positions, D] tables (both halves equal). Pass
    `q_out=q, k_out=k` to rotate in place.
    """
    if positions.dim() != 1 or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be a 1-D int32/int64 tensor, got {positions.dtype} "
                         f"{tuple(positions.shape)}")  # fmt: skip
    num_tokens, head_dim = positions.shape[0], q.shape[-1]
    if q.dtype not in FLOAT_DTYPES or head_dim % 2:
        raise ValueError(f"q must be float16/bfloat16/float32 with an even head_dim, got "
                         f"{q.dtype} {tuple(q.shape)}")  # fmt: skip
    _check_heads("q", q, num_tokens, head_dim, q.dtype, positions.device)
    _check_heads("k", k, num_tokens, head_dim, q.dtype, positions.device)
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dim() != 2 or table.shape[1] != head_dim or table.stride(1) != 1:
            raise ValueError(f"{name} must be a [max_positions, {head_dim}] table contiguous "
                             f"in its last dim, got {tuple(table.shape)}")  # fmt: skip
        if table.device != positions.device or table.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be a float table on {positions.device}")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if q_out is None else q_out
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device) if k_out is None else k_out
    _check_heads("q_out", q_out, num_tokens, head_dim, q.dtype, q.device)
    _check_heads("k_out", k_out, num_tokens, head_dim, q.dtype, q.device)
    if q_out.shape != q.shape or k_out.shape != k.shape:
        raise ValueError("q_out and k_out must have the shapes of q and k")
    if num_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        positions, q, k, cos, sin, q_out, k_out,
        q.shape[1], k.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        cos.stride(0), sin.stride(0),
        HALF=half, HALF_PAD=triton.next_power_of_2(half),
        QH_PAD=triton.next_power_of_2(q.shape[1]), KH_PAD=triton.next_power_of_2(k.shape[1]),
        # Without this LLVM narrows the float32 ops to bf16/fp16 ones and contracts a product
        # and the sum into one fma, skipping the product's rounding (~1.6% of outputs then
        # differ from torch by an ulp, seen on an H200).
        num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return q_out, k_out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_xt, stride_ot, inter, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + t * stride_xt + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * stride_xt + inter + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    # SiLU is rounded to the dtype before the product, as `F.silu(gate) * up` does.
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + cols, (act * up).to(dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU(gate) * up for `gate_up` [T, 2I] (gate first); returns [T, I]."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.dtype not in FLOAT_DTYPES:
        raise ValueError(f"gate_up must be a float [T, 2 * I] tensor, got {gate_up.dtype} "
                         f"{tuple(gate_up.shape)}")  # fmt: skip
    if gate_up.numel() and gate_up.stride(1) != 1:
        raise ValueError(f"gate_up must be contiguous in its last dim, got {gate_up.stride()}")
    num_tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    if out is None:
        out = torch.empty(num_tokens, inter, dtype=gate_up.dtype, device=gate_up.device)
    if (out.shape != (num_tokens, inter) or out.dtype != gate_up.dtype
            or out.device != gate_up.device):  # fmt: skip
        raise ValueError(f"out must be [{num_tokens}, {inter}] {gate_up.dtype} on {gate_up.device},"
                         f" got {tuple(out.shape)} {out.dtype} on {out.device}")  # fmt: skip
    if out.numel() and out.stride(1) != 1:
        raise ValueError(f"out must be contiguous in its last dim, got {out.stride()}")
    if out.numel() == 0:
        return out
    grid = (num_tokens, triton.cdiv(inter, _SILU_BLOCK))
    _silu_and_mul_kernel[grid](gate_up, out, gate_up.stride(0), out.stride(0), inter,
                               BLOCK=_SILU_BLOCK, num_warps=4)  # fmt: skip
    return out
