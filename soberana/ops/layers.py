"""RMSNorm, rotary embedding and SiLU-gated MLP activation.

The `torch_*` functions are the portable PyTorch path (the reference the kernels are tested
against). The modules start on it and hold whatever `ops/backend.py` chose at start
(`use_kernels`): the Triton kernels of `triton/layers.py` on GPUs, the native ones of
`csrc/cpu_layers.c` on CPUs; both round at the same points.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from soberana.ops.backend import Kernels


def gemv_linear(
    gemv,
    x: torch.Tensor,
    linear: nn.Linear,
    norm: RMSNorm | None = None,
    residual: torch.Tensor | None = None,
    gated: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`linear(x)` for a few rows in one launch of `gemv` (`triton/gemv.py`), with `norm`'s
    (add +) RMSNorm before it and, for a fused gate/up projection, SiLU-and-mul after it;
    returns (out, new residual)."""
    # a QuantLinear (soberana/quantization) brings its scales, zero points and group size
    return gemv(
        x, linear.weight, linear.bias,
        norm_weight=None if norm is None else norm.weight, eps=1e-6 if norm is None else norm.eps,
        residual=residual, gated=gated, weight_scale=getattr(linear, "weight_scale", None),
        weight_zero=getattr(linear, "weight_zero", None),
        group_size=getattr(linear, "group_size", 0),
    )  # fmt: skip


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in float32, as transformers does, cast back, times weight."""
    # transformers' ops and rounding points; in place on our own intermediates, because on
    # CPUs every large fresh tensor costs page faults (float32 input: x.float() is x itself).
    x32 = x.float()
    inv_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True).add_(eps))
    x32 = x32 * inv_rms if x.dtype == torch.float32 else x32.mul_(inv_rms)
    out = x32.to(x.dtype)
    if torch.promote_types(out.dtype, weight.dtype) != out.dtype:
        return weight * out
    return out.mul_(weight)


def torch_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(torch_rms_norm(x + residual), x + residual)."""
    residual = x + residual
    return torch_rms_norm(residual, weight, eps), residual


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as transformers does, then cast back.

    `per_head`: the q/k norms of Qwen3, over [T, heads, head_dim] views of the projection.
    """

    def __init__(self, dim: int, eps: float, per_head: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.per_head = per_head
        self.norm, self.add_norm = torch_rms_norm, torch_add_rms_norm

    def use_kernels(self, kernels: Kernels) -> None:
        """Run the backend's norm from now on (ops/backend.py)."""
        self.norm = kernels.head_rms_norm if self.per_head else kernels.rms_norm
        self.add_norm = kernels.add_rms_norm

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); with `residual`, (norm(x + residual), x + residual) in one pass."""
        if residual is None:
            return self.norm(x, self.weight, self.eps)
        return self.add_norm(x, residual, self.weight, self.eps)


def torch_rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embedding of q [T, Hq, D] and k [T, Hkv, D] from [P, D] tables."""
    # The tables stay float32 until indexed; the products are computed in the tensor dtype.
    cos_t = cos[positions].unsqueeze(1).to(q.dtype)
    sin_t = sin[positions].unsqueeze(1).to(q.dtype)
    # rotate_half(x) * sin == roll(x, D/2) * [-sin1 | sin2]: the same products (negation is
    # exact), with one copy of x instead of a negation and a cat (~15% faster on CPUs).
    half = q.shape[-1] // 2
    signed_sin = torch.cat((-sin_t[..., :half], sin_t[..., half:]), dim=-1)
    return _rotate(q, cos_t, signed_sin), _rotate(k, cos_t, signed_sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half layout) from a precomputed cos/sin table."""

    def __init__(self, inv_freq: torch.Tensor, max_positions: int) -> None:
        super().__init__()
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq.float())
        # [max_positions, head_dim]: cos and sin repeated over both halves.
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        self.rotate = torch_rotary_embedding

    def use_kernels(self, kernels: Kernels) -> None:
        """Run the backend's rotary embedding from now on (ops/backend.py)."""
        self.rotate = kernels.rotary_embedding

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, k) rotated; new tensors, the inputs are left as they are."""
        return self.rotate(positions, q, k, self.cos, self.sin)


def torch_silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for a fused [.., 2 * I] projection, in PyTorch ops."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)
