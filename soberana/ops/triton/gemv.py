"""Few-row GEMV for small steps: `x [M, K] @ W[N, K].T` for M <= 8 (batch-1 decode, small
decode batches, a speculative verification step of k + 1 <= 8 tokens), with the neighbouring
elementwise work fused in, so such a decoder layer is five launches instead of thirteen.

With a few rows a step is a stream of weights from HBM; what costs time around the matrix
products is the small kernels between them (RMSNorm, SiLU-and-mul, cuBLAS's split-K
reduction), the launches, and each kernel's ramp-up before its loads reach full bandwidth.
Each program streams its `BLOCK_N` rows of W once and multiplies them with all M input rows
(`tl.dot` needs 16 rows: here a broadcast multiply, ROWS = M padded to a power of two, each
thread summing the products of its `chunk_k` contiguous columns in registers before they
join a float32 accumulator [ROWS, BLOCK_N, BLOCK_K / chunk_k]; see `default_config`). Here
- the **prologue** can apply the layer's (residual add +) RMSNorm to `x`: every program reads
  the input rows (a few KB each, from L2) as it streams W, multiplies them by the norm's
  weight and scales each row's result by its own 1 / rms at the end, so no norm kernel runs;
  program 0 also writes the new residual stream;
- the **epilogue** can add a bias, or apply SiLU-and-mul to a fused gate/up projection: a
  program computes the same rows of the gate half and the up half and writes only
  `silu(gate) * up`;
- with **programmatic dependent launch** (Hopper and later), a program loads its first tile
  of W, which does not depend on the previous kernel, and only then waits for that kernel
  (`griddepcontrol.wait`), so its launch and first loads overlap the previous kernel's tail.
Each program owns `BLOCK_N` whole rows of W (no split-K): results are deterministic. Rounding
follows the unfused chain where it can: the residual sum, the projection and the activation
are rounded to the tensor dtype where `soberana/ops/layers.py` rounds them. The normed input
is not: the product reads `x * norm_weight` rounded once and applies 1 / rms in float32
afterwards, where the eager chain rounds `x / rms` and then its product with the weight (the
same value to within a rounding of the input, in one pass over it instead of two).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@dataclass(frozen=True)
class GemvConfig:
    """Launch parameters: rows of W per program, reduction width per iteration, and
    `chunk_k`, the columns whose products a thread sums in registers before accumulating
    (1: every product accumulates in its own float32 lane, as the one-row kernel does)."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    chunk_k: int = 1


# Measured on an H200 at Llama-3.1-8B's four projections (benchmarks/gpu/decode_kernels.py
# --sweep): many narrow programs, 4 rows of W each, streamed in 1024-wide slices, reach
# 3.2-4.1 TB/s; pipeline depth made no difference.
DEFAULT_CONFIG = GemvConfig(block_n=4, block_k=1024, num_warps=4, num_stages=1)

# The most input rows one launch takes: a speculative verification of k = 7 drafts, or a
# decode batch of 8. Past that a step's GEMMs are cuBLAS's.
MAX_ROWS = 8


def default_config(weight_dtype: torch.dtype, int4: bool = False, rows: int = 1) -> GemvConfig:
    """The tile shape for `rows` input rows and weights stored as `weight_dtype` (uint8 with
    `int4`: packed int4).

    One row: every product accumulates in its own float32 lane ([BLOCK_N, BLOCK_K], 32
    registers a thread), summed across the program once after the loop. Several rows would
    need ROWS times those registers; instead each thread first sums the products of its
    `chunk_k` contiguous columns (one 16-byte load of the activations: 8 bfloat16, 4
    float32) in registers, so the accumulator is [ROWS, BLOCK_N, BLOCK_K / chunk_k]: ROWS x
    BLOCK_N registers a thread when BLOCK_K = 32 x num_warps x chunk_k, which lays the 4
    warps along K (compiled for sm_90 without a GPU: no per-iteration layout conversion,
    bf16 5 rows 207 registers, 249 with the gate/up pair, no spills). The W tile stays one
    row's. Not yet timed on a GPU: sweep with decode_kernels.py --rows 2,4,5,8 --sweep.

    One row: one shape for every format. 2048-column tiles for one-byte and int4 weights (16-byte loads
    per thread for int8) were tried on an H100 (benchmarks/results/gpu_h100/session12): fp8
    259.6 tok/s batch-1 (249.5 with 1024 in session 11), int8 236.4 (262.0), and int4 8.0 tok/s
    (cause not established; likely register spills of its dequantized [4, 2048] tiles). Sweep them per format with
    benchmarks/gpu/quant_gemv_sweep.py before changing this.
    """
    padded = triton.next_power_of_2(rows)
    if padded == 1:
        return DEFAULT_CONFIG
    chunk = 4 if weight_dtype == torch.float32 else 8  # 16 bytes of the activations
    warps = DEFAULT_CONFIG.num_warps
    # int4's per-column scales and zero points: 4 rows of W spill with gate/up (2 inputs)
    block_n = 2 if int4 else DEFAULT_CONFIG.block_n
    return GemvConfig(block_n, 32 * warps * chunk, warps, DEFAULT_CONFIG.num_stages,
                      chunk)  # fmt: skip


@functools.lru_cache(maxsize=8)
def supports_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch: NVIDIA GPUs of compute capability 9.0 (Hopper) or later
    (ROCm reports its gfx9 GPUs as capability 9.x too, and has no such launch)."""
    return (device.type == "cuda" and torch.version.hip is None
            and torch.cuda.get_device_capability(device)[0] >= 9)  # fmt: skip


@triton.jit
def _load_rows(w_rows, s_rows, z_rows, k0, col_ok, K, EVEN: tl.constexpr, INT4: tl.constexpr,
               GROUP: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """This program's rows of W at columns k0:k0+BLOCK_K: as stored, or for int4 (two per
    byte, a scale and zero point per GROUP columns) dequantized to float32 in registers."""
    ks = k0 + tl.arange(0, BLOCK_K)
    if INT4:
        # k0 is even: the run's bytes, element 2i in byte i's low nibble
        kh = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(w_rows + kh[None, :], mask=col_ok[:, None] & (kh < K // 2)[None, :],
                         other=0)  # fmt: skip
        q = tl.interleave(packed & 0xF, packed >> 4).to(tl.float32)
        ok = col_ok[:, None] & (ks < K)[None, :]
        # one scale per GROUP columns: the repeated addresses are served by L1
        s = tl.load(s_rows + (ks // GROUP)[None, :], mask=ok, other=0.0).to(tl.float32)
        z = tl.load(z_rows + (ks // GROUP)[None, :], mask=ok, other=0).to(tl.float32)
        w = (q - z) * s
    elif EVEN:
        w = tl.load(w_rows + ks[None, :])
    else:
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & (ks < K)[None, :], other=0.0)
    # One return: Triton (3.6) compiles every return of a function, constexpr branch or not.
    return w


@triton.jit
def _accumulate(acc, acc_up, sum_sq, w, w_up, k0, x_rows, res_rows, norm_w_ptr, res_out_rows,
                row_ok, K, pid, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                GATED: tl.constexpr, EVEN: tl.constexpr, FULL: tl.constexpr,
                ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                CHUNK: tl.constexpr):  # fmt: skip
    """Fold the input rows' slice `k0:k0+BLOCK_K` times this program's tile(s) of W into
    `acc` [ROWS, BLOCK_N, BLOCK_K / CHUNK]."""
    ks = k0 + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    ok = row_ok[:, None] & k_ok[None, :]
    if EVEN and FULL:
        x = tl.load(x_rows + ks[None, :])
    else:
        x = tl.load(x_rows + ks[None, :], mask=ok, other=0.0)
    if HAS_RESIDUAL:
        # The rounded sum, as the eager `x + residual` is; program 0 writes it out.
        r = tl.load(res_rows + ks[None, :], mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_rows + ks[None, :], x, mask=ok & (pid == 0))
    xf = x.to(tl.float32)
    if NORM:
        # Squares build up elementwise (or per chunk, within a thread) and are summed once
        # at the end: a reduction across the program's threads in every iteration would
        # stall the stream of weight loads.
        sum_sq += tl.sum(tl.reshape(xf * xf, (ROWS, BLOCK_K // CHUNK, CHUNK)), axis=2)
        g = tl.load(norm_w_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        xf = (xf * g[None, :]).to(x.dtype).to(tl.float32)
    # [ROWS, BLOCK_N, chunks, CHUNK]: the last axis is one thread's contiguous columns,
    # summed in its registers; the sum across chunks (threads) runs after the loop.
    x4 = tl.reshape(xf, (ROWS, 1, BLOCK_K // CHUNK, CHUNK))
    w4 = tl.reshape(w.to(tl.float32), (1, BLOCK_N, BLOCK_K // CHUNK, CHUNK))
    acc += tl.sum(w4 * x4, axis=3)
    if GATED:
        w4_up = tl.reshape(w_up.to(tl.float32), (1, BLOCK_N, BLOCK_K // CHUNK, CHUNK))
        acc_up += tl.sum(w4_up * x4, axis=3)
    return acc, acc_up, sum_sq


@triton.jit
def _gemv_kernel(
    x_ptr, res_ptr, norm_w_ptr, w_ptr, bias_ptr, out_ptr, res_out_ptr, scale_ptr, zero_ptr,
    M, N, K, eps, stride_xm, stride_rm, stride_om, stride_wn, stride_sn,
    NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr, EVEN: tl.constexpr, FULL: tl.constexpr, PDL: tl.constexpr,
    ROW_SCALE: tl.constexpr, INT4: tl.constexpr, GROUP: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    # The M input rows, padded to ROWS (a power of two): padding rows load zeros, store nothing
    # (FULL: M is a power of two, no padding rows).
    rows = tl.arange(0, ROWS)
    row_ok = rows < M
    x_rows = x_ptr + rows[:, None] * stride_xm
    res_rows = res_ptr + rows[:, None] * stride_rm
    res_out_rows = res_out_ptr + rows[:, None] * K  # the new residual is contiguous
    w_rows = w_ptr + cols[:, None] * stride_wn
    # The up half's rows sit N rows below the gate half's (their scales too).
    w_up_rows = w_rows + N * stride_wn
    s_rows = scale_ptr + cols[:, None] * stride_sn
    z_rows = zero_ptr + cols[:, None] * stride_sn
    s_up_rows = s_rows + N * stride_sn
    z_up_rows = z_rows + N * stride_sn
    # The first tile of W depends on nothing the previous kernel writes: load it, then wait.
    w = _load_rows(w_rows, s_rows, z_rows, 0, col_ok, K, EVEN, INT4, GROUP, BLOCK_K)
    w_up = w
    if GATED:
        w_up = _load_rows(w_up_rows, s_up_rows, z_up_rows, 0, col_ok, K, EVEN, INT4, GROUP,
                          BLOCK_K)  # fmt: skip
    if PDL:
        gdc_wait()  # the previous kernel's writes (x, residual) are visible from here on
        gdc_launch_dependents()
    # Products accumulate per column (or per thread's chunk of columns) and are summed over
    # K once, after the loop: one order of the float32 sum per (row, column) whatever the
    # GPU's timing, no split-K, so the results are deterministic.
    acc = tl.zeros([ROWS, BLOCK_N, BLOCK_K // CHUNK], tl.float32)
    acc_up = tl.zeros([ROWS, BLOCK_N, BLOCK_K // CHUNK], tl.float32)
    sum_sq = tl.zeros([ROWS, BLOCK_K // CHUNK], tl.float32)
    acc, acc_up, sum_sq = _accumulate(acc, acc_up, sum_sq, w, w_up, 0, x_rows, res_rows,
                                      norm_w_ptr, res_out_rows, row_ok, K, pid, NORM,
                                      HAS_RESIDUAL, GATED, EVEN, FULL, ROWS, BLOCK_N,
                                      BLOCK_K, CHUNK)  # fmt: skip
    for k0 in range(BLOCK_K, K, BLOCK_K):
        w = _load_rows(w_rows, s_rows, z_rows, k0, col_ok, K, EVEN, INT4, GROUP, BLOCK_K)
        if GATED:
            w_up = _load_rows(w_up_rows, s_up_rows, z_up_rows, k0, col_ok, K, EVEN, INT4, GROUP,
                              BLOCK_K)  # fmt: skip
        acc, acc_up, sum_sq = _accumulate(acc, acc_up, sum_sq, w, w_up, k0, x_rows, res_rows,
                                          norm_w_ptr, res_out_rows, row_ok, K, pid, NORM,
                                          HAS_RESIDUAL, GATED, EVEN, FULL, ROWS,
                                          BLOCK_N, BLOCK_K, CHUNK)  # fmt: skip

    out = tl.sum(acc, axis=2)  # [ROWS, BLOCK_N]
    out_up = tl.sum(acc_up, axis=2)
    if ROW_SCALE:  # int8 / fp8: one scale per row of W, out of the sum
        out *= tl.load(scale_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            out_up *= tl.load(scale_ptr + N + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if NORM:  # each input row's own 1 / rms
        inv_rms = tl.math.rsqrt(tl.sum(sum_sq, axis=1) / K + eps)[:, None]
        out = out * inv_rms
        out_up = out_up * inv_rms
    out_dtype = out_ptr.dtype.element_ty
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            out_up += tl.load(bias_ptr + N + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        # silu(gate) * up with the gate, the up projection and the SiLU each rounded to the
        # dtype, as `F.silu(gate).mul_(up)` on the projection's output rounds them.
        gate = out.to(out_dtype).to(tl.float32)
        up = out_up.to(out_dtype).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(out_dtype).to(tl.float32)
        out = act * up
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], out.to(out_dtype),
             mask=row_ok[:, None] & col_ok[None, :])


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    gated: bool = False,
    config: GemvConfig | None = None,
    weight_scale: torch.Tensor | None = None,
    weight_zero: torch.Tensor | None = None,
    group_size: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`x @ weight.T (+ bias)` for a few rows `x` [M, K], M <= MAX_ROWS; returns
    (out, new residual).

    Quantized weights (soberana/quantization): int8 or fp8 `weight` [N, K] with a per-row
    `weight_scale` [N]; or int4, `weight` uint8 [N, K/2] two per byte with `weight_scale` and
    `weight_zero` [N, K/group_size].

    With `norm_weight`, each row of `x` is first replaced by
    `RMSNorm(x (+ residual)) * norm_weight`; the second result is then `x + residual` (or `x`
    itself without a residual), else None. With `gated`, `weight` is a fused [2I, K] gate/up
    projection and out is `silu(gate) * up` [M, I].
    """
    _check(x, weight, bias, norm_weight, residual, gated, weight_scale, weight_zero, group_size)
    m, k = x.shape
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    int4 = weight_zero is not None
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    new_residual = None
    if norm_weight is not None:
        new_residual = x if residual is None else torch.empty(m, k, dtype=x.dtype,
                                                              device=x.device)  # fmt: skip
    cfg = config or default_config(weight.dtype, int4, m)
    if cfg.block_k % cfg.chunk_k:
        raise ValueError(f"config: chunk_k {cfg.chunk_k} must divide block_k {cfg.block_k}")
    res = residual if residual is not None else x
    pdl = supports_pdl(x.device)
    rows = triton.next_power_of_2(m)
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, res, norm_weight if norm_weight is not None else weight, weight,
        bias if bias is not None else weight, out,
        new_residual if residual is not None else out,  # unused without a residual
        weight_scale if weight_scale is not None else weight,
        weight_zero if int4 else weight,
        m, n, k, eps, x.stride(0), res.stride(0), out.stride(0), weight.stride(0),
        weight_scale.stride(0) if int4 else 0,
        NORM=norm_weight is not None, HAS_RESIDUAL=residual is not None,
        HAS_BIAS=bias is not None, GATED=gated,
        EVEN=n % cfg.block_n == 0 and k % cfg.block_k == 0, FULL=m == rows, PDL=pdl,
        ROW_SCALE=weight_scale is not None and not int4, INT4=int4, GROUP=max(group_size, 1),
        ROWS=rows, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        CHUNK=cfg.chunk_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=pdl,
    )  # fmt: skip
    return out, new_residual


def _check(x, weight, bias, norm_weight, residual, gated, weight_scale, weight_zero,
           group_size) -> None:  # fmt: skip
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS or x.stride(1) != 1:
        raise ValueError(f"x must be 1 to {MAX_ROWS} rows [M, K], each contiguous; got shape "
                         f"{tuple(x.shape)} with strides {x.stride()}")  # fmt: skip
    cols = x.shape[1] // 2 if weight_zero is not None else x.shape[1]
    if weight.dim() != 2 or weight.shape[1] != cols or weight.stride(1) != 1:
        raise ValueError(f"weight must be a row-major [N, {cols}] tensor, got "
                         f"{tuple(weight.shape)} with strides {weight.stride()}")  # fmt: skip
    if gated and weight.shape[0] % 2:
        raise ValueError(f"a gated weight stacks gate and up rows: got {weight.shape[0]} rows")
    if weight_scale is not None:
        groups = () if weight_zero is None else (x.shape[1] // max(group_size, 1),)
        want = (weight.shape[0], *groups)
        if weight_scale.shape != want or not weight_scale.is_contiguous() or (
                weight_zero is not None and weight_zero.shape != want):  # fmt: skip
            raise ValueError(f"weight_scale (and weight_zero) must be contiguous {want}; got "
                             f"{tuple(weight_scale.shape)}")  # fmt: skip
        if weight_zero is not None and (group_size < 2 or x.shape[1] % group_size):
            raise ValueError(f"int4 group_size must divide K={x.shape[1]}; got {group_size}")
    elif x.dtype != weight.dtype or x.device != weight.device:
        raise ValueError(f"x ({x.dtype} on {x.device}) and weight ({weight.dtype} on "
                         f"{weight.device}) must match")  # fmt: skip
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
