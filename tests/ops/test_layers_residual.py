"""`soberana/ops/layers.py` on the CPU: the residual form of RMSNorm, and no Triton anywhere."""

import torch

from soberana.ops.layers import RMSNorm, torch_rms_norm, uses_triton


def test_rms_norm_with_a_residual_returns_the_sum_and_its_norm_bit_for_bit():
    # The model's `x = x + attn(...)`, then `norm(x)`, computed in one call: the CPU path must
    # give exactly the old two-step result, since CPU tests compare tokens with transformers.
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(64, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=gen))
    for dtype in (torch.float32, torch.bfloat16):
        x, residual = (torch.randn(5, 64, generator=gen).to(dtype) for _ in range(2))
        normed, summed = norm.to(dtype)(x, residual)
        assert torch.equal(summed, residual + x)
        assert torch.equal(normed, torch_rms_norm(residual + x, norm.weight, 1e-6))
        assert torch.equal(norm(x), torch_rms_norm(x, norm.weight, 1e-6))


def test_cpu_tensors_never_take_the_triton_path():
    assert not uses_triton(torch.zeros(1))
