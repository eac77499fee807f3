"""RMSNorm, rotary embedding and SiLU-gated MLP activation.

The `torch_*` functions are the portable PyTorch path (CPUs, and the reference the kernels
are tested against). On CUDA, where Triton imports, the layers run the fused Triton kernels
of `triton_fused.py` instead, which round at the same points.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def _triton_ops():
    """The fused Triton kernels, or None where Triton is missing (CPU builds)."""
    try:
        from soberana.ops import triton_fused
    except ImportError:
        return None
    return triton_fused


def uses_triton(x: torch.Tensor) -> bool:
    """Whether ops on `x` run the Triton kernels (CUDA tensors, Triton installed)."""
    return x.device.type == "cuda" and _triton_ops() is not None


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in float32, as transformers does, cast back, times weight."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as transformers does, then cast back."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); with `residual`, (norm(x + residual), x + residual) in one pass on GPUs."""
        if uses_triton(x) and x.dim() in (2, 3):
            if residual is None:
                return _triton_ops().rms_norm(x, self.weight, self.eps)
            return _triton_ops().fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return torch_rms_norm(x, self.weight, self.eps)
        residual = x + residual
        return torch_rms_norm(residual, self.weight, self.eps), residual


def torch_rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embedding of q [T, Hq, D] and k [T, Hkv, D] from [P, D] tables."""
    # The tables stay float32 until indexed; the products are computed in the tensor dtype.
    cos_t = cos[positions].unsqueeze(1)
    sin_t = sin[positions].unsqueeze(1)
    return _rotate(q, cos_t, sin_t), _rotate(k, cos_t, sin_t)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    return x * cos + rotated * sin


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

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, k) rotated; new tensors, the inputs are left as they are."""
        if uses_triton(q):
            return _triton_ops().rotary_embedding(positions, q, k, self.cos, self.sin)
        return torch_rotary_embedding(positions, q, k, self.cos, self.sin)


def torch_silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for a fused [.., 2 * I] projection, in PyTorch ops."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for a fused [.., 2 * I] projection (gate first)."""
    if uses_triton(gate_up) and gate_up.dim() == 2:
        return _triton_ops().silu_and_mul(gate_up)
    return torch_silu_and_mul(gate_up)
