"""Dynamic per-token quantization of activations for the W8A8 GEMMs, in one kernel: each row
of x [M, K] is read once, the largest |value| of each group of its inputs (the whole row, or
128 inputs for GPU int8) sets that group's scale, and the row is written once as
float8_e4m3fn or int8 with float32 scales (vLLM's `dynamic_per_token_scaled_fp8_quant`,
`per_token_group_quant_int8`). The eager PyTorch chain it replaces launched ~7 kernels and
made float32 copies of the rows (measured in issue 20: fp8 W8A8 at 0.97x bf16 on an H100).

The result equals `schemes.quantize_fp8_per_token` / `quantize_int8_per_token` bit for bit:
the scale and the quotient are true float32 divisions (`div_rn`, as torch's tensor division),
and the quotient is rounded half to even onto the target grid in float32 before the cast, so
the cast itself is exact. (Rounding first also keeps Triton's interpreter faithful: its
float8 cast truncates.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from soberana.quantization.schemes import FP8_MAX, INT8_MAX

# Elements a program holds in registers: groups up to this size are read once.
_MAX_TILE = 16384
_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _round_to_grid(y, FP8: tl.constexpr):
    """y (|y| <= 448 for fp8, <= 127 for int8) rounded half to even onto the float8_e4m3fn
    grid or the integers: adding and subtracting 1.5 * 2^(q + 23) rounds a float32 to a
    multiple of 2^q (its spacing up there is 2^q)."""
    if FP8:
        # e4m3 keeps 3 bits below the leading one; below 2^-6 the spacing stays 2^-9
        exponent = ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        q = tl.maximum(exponent, -6) - 3
        magic = (((q + 23 + 127) << 23) | 0x400000).to(tl.float32, bitcast=True)
    else:
        magic = 12582912.0  # 1.5 * 2^23: spacing 1
    r = (y + magic) - magic
    if FP8:
        r = tl.where(r == 0.0, y * 0.0, r)  # keep the sign of a zero, as the cast does
    return r


@triton.jit
def _per_token_quant_kernel(
    x_ptr, q_ptr, s_ptr, K, group, num_groups, stride_xm, stride_qm, stride_sm,
    QMAX: tl.constexpr, FP8: tl.constexpr, GROUPS: tl.constexpr, BLOCK: tl.constexpr,
    ONE_TILE: tl.constexpr,
):  # fmt: skip
    # Program (row, j) quantizes groups j * GROUPS.. of one row, a [GROUPS, BLOCK] tile (a
    # group padded to BLOCK). A whole row is one group of up to BLOCK; longer rows
    # (ONE_TILE false, GROUPS 1) are read twice, the second time mostly from L2.
    row = tl.program_id(0).to(tl.int64)
    gs = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    cols = tl.arange(0, BLOCK)
    x_row, q_row = x_ptr + row * stride_xm, q_ptr + row * stride_qm
    if ONE_TILE:
        offs = gs[:, None] * group + cols[None, :]
        mask = (gs[:, None] < num_groups) & (cols[None, :] < group)
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)
    else:
        top = tl.zeros([BLOCK], tl.float32)
        for k0 in range(0, K, BLOCK):
            xk = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            top = tl.maximum(top, tl.abs(xk))
        amax = tl.max(top, axis=0)
    scale = tl.math.div_rn(tl.maximum(amax, 1e-12), QMAX)
    if ONE_TILE:
        tl.store(s_ptr + row * stride_sm + gs, scale, mask=gs < num_groups)
        y = tl.minimum(tl.maximum(tl.math.div_rn(x, scale[:, None]), -QMAX), QMAX)
        tl.store(q_row + offs, _round_to_grid(y, FP8).to(q_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(s_ptr + row * stride_sm, scale)
        for k0 in range(0, K, BLOCK):
            kmask = k0 + cols < K
            xk = tl.load(x_row + k0 + cols, mask=kmask, other=0.0).to(tl.float32)
            y = tl.minimum(tl.maximum(tl.math.div_rn(xk, scale), -QMAX), QMAX)
            tl.store(q_row + k0 + cols, _round_to_grid(y, FP8).to(q_ptr.dtype.element_ty),
                     mask=kmask)  # fmt: skip


def per_token_quant(x: torch.Tensor, dtype: torch.dtype, group: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Rows x [M, K] quantized to `dtype` (torch.float8_e4m3fn or torch.int8) with one
    symmetric scale per `group` inputs of a row (None: per row): (xq [M, K], scale float32
    [M, K / group]), x ~ xq * scale."""
    if dtype not in (torch.float8_e4m3fn, torch.int8):
        raise ValueError(f"per_token_quant: dtype must be torch.float8_e4m3fn or torch.int8; "
                         f"got {dtype}")  # fmt: skip
    if x.dim() != 2 or x.dtype not in _INPUT_DTYPES or (x.numel() and x.stride(1) != 1):
        raise ValueError(f"per_token_quant: x must be a float [M, K] tensor contiguous in K; "
                         f"got {x.dtype} {tuple(x.shape)} strides {x.stride()}")  # fmt: skip
    m, k = x.shape
    group = group or k
    if group < 1 or k % group or (_MAX_TILE < group < k):
        raise ValueError(f"per_token_quant: group {group} must divide K={k} and be at most "
                         f"{_MAX_TILE} (or K itself)")  # fmt: skip
    num_groups = k // group
    xq = torch.empty(m, k, dtype=dtype, device=x.device)
    scale = torch.empty(m, num_groups, dtype=torch.float32, device=x.device)
    if m == 0:
        return xq, scale
    block = min(triton.next_power_of_2(group), _MAX_TILE)
    groups = max(1, min(triton.next_power_of_2(num_groups), _MAX_TILE // block))
    fp8 = dtype == torch.float8_e4m3fn
    _per_token_quant_kernel[(m, triton.cdiv(num_groups, groups))](
        x, xq, scale, k, group, num_groups, x.stride(0), xq.stride(0), scale.stride(0),
        QMAX=FP8_MAX if fp8 else INT8_MAX, FP8=fp8, GROUPS=groups, BLOCK=block,
        ONE_TILE=block >= group, num_warps=min(16, max(4, groups * block // 1024)),
    )  # fmt: skip
    return xq, scale
