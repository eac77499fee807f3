"""`soberana/ops/layers.py` on the CPU: the residual form of RMSNorm, and no Triton anywhere."""

import pytest
import torch

from soberana.ops.backend import select_backend
from soberana.ops.layers import RMSNorm, torch_rms_norm


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_rms_norm_with_a_residual_returns_the_sum_and_its_norm_bit_for_bit(backend):
    # The model's `x = x + attn(...)`, then `norm(x)`, computed in one call: the CPU path must
    # give the old two-step result, since CPU tests compare tokens with transformers. The sum
    # exactly; the norm within an ulp: the native kernel (cpu_layers.c) sums the squares in
    # another order.
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(64, 1e-6)
    norm.use_kernels(select_backend(backend, torch.device("cpu"), torch.float32).kernels)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=gen))
    for dtype in (torch.float32, torch.bfloat16):
        x, residual = (torch.randn(5, 64, generator=gen).to(dtype) for _ in range(2))
        normed, summed = norm.to(dtype)(x, residual)
        assert torch.equal(summed, residual + x)
        same = _within_an_ulp
        assert same(normed, torch_rms_norm(residual + x, norm.weight, 1e-6))
        assert same(norm(x), torch_rms_norm(x, norm.weight, 1e-6))


def _within_an_ulp(a, b):
    tol = 2e-6 if a.dtype == torch.float32 else 2.0**-7
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=1e-6)
    return True


def test_a_cpu_never_gets_the_triton_backend_by_default():
    assert select_backend("auto", torch.device("cpu"), torch.float32).name in ("native", "torch")
