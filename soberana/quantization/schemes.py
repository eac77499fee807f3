"""The arithmetic of each weight format: quantize a float matrix, and dequantize it back.

These functions are the reference every kernel is tested against: a quantized linear computes
`x @ dequantize(...).T` up to the order of its float32 sums. Rows are quantized independently
(every scale belongs to one output row), so a fused projection's shards (q, k, v; gate, up)
can be quantized one at a time as they are read from the checkpoint.
"""

from __future__ import annotations

import torch

INT4_GROUP_SIZE = 128  # group-wise int4: one scale and zero point per 128 inputs of a row
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0  # symmetric int8: -127..127


def quantize_int8(w: torch.Tensor, amax: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-output-channel symmetric int8: (qweight int8 [N, K], scale float32 [N]). `amax`:
    each row's largest |value| when `w` holds only some of its columns (default: w's own)."""
    w = w.float()
    amax = w.abs().amax(dim=1) if amax is None else amax.float()
    scale = amax.clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 [N, K] of an int8 weight."""
    return q.float() * scale.float()[:, None]


INT8_ACTIVATION_BLOCK = 32  # inputs per activation scale of W8A8 int8 on CPUs
# ... and on GPUs (tl.dot per group of 128 keeps the int8 tensor cores busy; one scale per row
# costs SmolLM2 +3.9% perplexity, per 128 +0.73%, per 32 +0.46%, W8A16 +0.41% on 4k tokens;
# per 128 +0.88% on the 20k corpus: benchmarks/results/int8_activation_groups_smollm2*.json)
INT8_GPU_ACTIVATION_GROUP = 128


def quantize_int8_blocks(x: torch.Tensor, block: int = INT8_ACTIVATION_BLOCK
                         ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Dynamic symmetric int8 of activations x [M, K] with one scale per `block` inputs of a
    row, as the W8A8 CPU kernel quantizes them (and llama.cpp's Q8_0): (xq int8 [M, K],
    scale float32 [M, K / block]), x ~ xq * scale; a block of zeros has scale 0. float32
    throughout, rounding half to even."""
    m, k = x.shape
    g = x.float().reshape(m, k // block, block)
    amax = g.abs().amax(dim=2)
    # a true float32 division, as the kernel's (`127.0 / amax` is reciprocal(amax) * 127)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(g * inv[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(m, k), amax / 127.0


def int8_w8a8_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                        bias: torch.Tensor | None = None,
                        block: int = INT8_ACTIVATION_BLOCK) -> torch.Tensor:  # fmt: skip
    """x [M, K] times int8 weight q [N, K] (scales [N]) with x quantized per block
    (`quantize_int8_blocks`): each block's integer dot product (exact), times the block's
    scale, summed over blocks (float64 here: the kernel's float32 sum differs only by its
    order), times the weight scale, plus bias; float32 [M, N]."""
    m, k = x.shape
    xq, x_scale = quantize_int8_blocks(x, block)
    dots = torch.einsum("mbi,nbi->mnb", xq.reshape(m, k // block, block).to(torch.int64),
                        q.reshape(-1, k // block, block).to(torch.int64))  # fmt: skip
    y = (dots.double() * x_scale.double()[:, None, :]).sum(dim=2) * scale.double()[None, :]
    if bias is not None:
        y = y + bias.double()
    return y.float()


def quantize_int4(
    w: torch.Tensor, group_size: int = INT4_GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric int4 along the input dim, two values per byte.

    Returns (packed uint8 [N, K/2], scale float32 [N, K/g], zero uint8 [N, K/g]) with
    w ~ (q - zero) * scale and q in 0..15; element 2i of a row in byte i's low nibble,
    2i + 1 in its high nibble.
    """
    n, k = w.shape
    _check_group(k, group_size)
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(dim=2).clamp(max=0.0), g.amax(dim=2).clamp(min=0.0)  # 0.0 stays exact
    scale = ((hi - lo) / 15.0).clamp_(min=1e-12)
    zero = torch.round(-lo / scale).clamp_(0, 15)
    q = torch.round(g / scale[..., None] + zero[..., None]).clamp_(0, 15).to(torch.uint8)
    q = q.reshape(n, k)
    return pack_int4(q), scale, zero.to(torch.uint8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] of values 0..15 to [N, K/2], even elements in the low nibbles."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] to the values 0..15 [N, K]."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
) -> torch.Tensor:
    """float32 [N, K] of a group-wise int4 weight."""
    q = unpack_int4(packed).float()
    n, k = q.shape
    groups = scale.shape[1]
    q = q.reshape(n, groups, k // groups) - zero.float()[..., None]
    return (q * scale.float()[..., None]).reshape(n, k)


def quantize_fp8(w: torch.Tensor, amax: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-output-channel float8_e4m3fn: (qweight [N, K], scale float32 [N]); `amax` as for
    quantize_int8."""
    w = w.float()
    amax = w.abs().amax(dim=1) if amax is None else amax.float()
    scale = amax.clamp(min=1e-12) / FP8_MAX
    q = (w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 [N, K] of an fp8 weight."""
    return q.float() * scale.float()[:, None]


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token activation scales (W8A8): (x fp8 [M, K], scale float32 [M, 1])."""
    x32 = x.float()
    scale = _per_token_scale(x32, FP8_MAX)
    return (x32 / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def quantize_int8_per_token(x: torch.Tensor, group: int | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Dynamic symmetric int8 per token (W8A8 on GPUs), with one scale per `group` inputs of
    a row (None: the whole row): (x int8 [M, K], scale float32 [M, K / group]), rounding
    half to even. Unlike `quantize_int8_blocks` (the CPU kernel's) it divides by the scale."""
    m, k = x.shape
    group = group or k
    g = x.float().reshape(m, k // group, group)
    scale = _per_token_scale(g.reshape(-1, group), INT8_MAX).reshape(m, k // group, 1)
    q = torch.round(g / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.reshape(m, k), scale.reshape(m, k // group)


def _per_token_scale(x32: torch.Tensor, qmax: float) -> torch.Tensor:
    # A true float32 division on every device (CUDA's `tensor / python_scalar` multiplies by
    # the rounded reciprocal), so that the Triton kernel (ops/triton/per_token_quant.py) can
    # equal it bit for bit.
    amax = x32.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12)
    return amax / torch.full_like(amax, qmax)


def group_size_for(k: int, group_size: int = INT4_GROUP_SIZE) -> int:
    """`group_size` where it divides the input size `k`, else the largest of 64, 32 and 16
    that does (SmolLM2's 576 = 4.5 x 128 takes groups of 64, the demo's 688 = 43 x 16 groups
    of 16): int4 weights and GPU int8 activations are scaled per group; the GEMMs' K tile is
    one group and `tl.dot` needs K >= 16."""
    for g in (group_size, 64, 32, 16):
        if g <= group_size and k % g == 0:
            return g
    raise ValueError(f"group-wise scales need an input size divisible by 16; got {k}")


def _check_group(k: int, group_size: int) -> None:
    if group_size < 2 or group_size % 2 or k % group_size:
        raise ValueError(f"int4 group_size must be even and divide the input size {k}; "
                         f"got {group_size}")  # fmt: skip
