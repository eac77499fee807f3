"""The quantized-weight Triton kernels (dequantizing GEMV for one-token steps, int8/int4
GEMM for batched steps) run by Triton's CPU interpreter on small shapes, against
`x @ dequantize(W).T` in PyTorch (soberana/quantization/schemes.py).

Float32 activations (the interpreter mishandles bfloat16 in `tl.dot`); tests/gpu covers
bfloat16 at model shapes.
"""

import os

import pytest
import torch

from tests.ops.interpreted import INTERPRETED

pytest.importorskip("triton")
pytestmark = INTERPRETED

from soberana.ops.triton.gemv import GemvConfig, gemv  # noqa: E402
from soberana.ops.triton.quant_gemm import int4_matmul, int8_matmul  # noqa: E402
from soberana.quantization import schemes  # noqa: E402


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def _relative_error(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


def _weights(n, k, gen):
    return torch.randn(n, k, generator=gen) * k**-0.5


# rows and K that split into the tiles evenly, and ones that leave ragged edges
@pytest.mark.parametrize("m,n,k", [(16, 64, 128), (5, 40, 192), (33, 72, 64)])
def test_int8_gemm_equals_dequantized_reference(m, n, k, gen):
    x = torch.randn(m, k, generator=gen)
    q, scale = schemes.quantize_int8(_weights(n, k, gen))
    out = int8_matmul(x, q, scale)
    ref = x @ schemes.dequantize_int8(q, scale).T
    assert _relative_error(out, ref) < 1e-5


@pytest.mark.parametrize("m,n,k,group", [(16, 64, 128, 64), (7, 40, 256, 128), (20, 24, 96, 32),
                                         (9, 24, 688, 16)])  # the demo's MLP width
def test_int4_gemm_equals_dequantized_reference(m, n, k, group, gen):
    x = torch.randn(m, k, generator=gen)
    packed, scale, zero = schemes.quantize_int4(_weights(n, k, gen), group)
    out = int4_matmul(x, packed, scale, zero, group)
    ref = x @ schemes.dequantize_int4(packed, scale, zero).T
    assert _relative_error(out, ref) < 1e-5


CONFIG = GemvConfig(16, 32, 4, 1)


# input rows: one (batch-1 decode) and the few-row path's (padded to 2, 4 and 8)
ROWS = [1, 2, 3, 5, 8]


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("m", ROWS)
def test_row_scaled_gemv_equals_dequantized_reference(fmt, gated, m, gen):
    n, k = 37, 99  # odd in both
    rows = 2 * n if gated else n
    quantize, dequantize = {"int8": (schemes.quantize_int8, schemes.dequantize_int8),
                            "fp8": (schemes.quantize_fp8, schemes.dequantize_fp8)}[fmt]
    q, scale = quantize(_weights(rows, k, gen))
    x = torch.randn(m, k, generator=gen)
    # the default tile shape for m rows, small ones that leave ragged tiles
    for config in (None, CONFIG, GemvConfig(8, 32, 4, 1, chunk_k=8)):
        out, _ = gemv(x, q, weight_scale=scale, gated=gated, config=config)
        ref = x @ dequantize(q, scale).T
        if gated:
            gate, up = ref.chunk(2, dim=-1)
            ref = torch.nn.functional.silu(gate) * up
        assert out.shape == (m, n)
        assert _relative_error(out, ref) < 1e-5


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("m", ROWS)
def test_int4_gemv_with_fused_norm_equals_dequantized_reference(gated, m, gen):
    n, k, group = 37, 160, 32  # odd rows; K not a multiple of the default 1024 / rows tile
    rows = 2 * n if gated else n
    packed, scale, zero = schemes.quantize_int4(_weights(rows, k, gen), group)
    x, residual = torch.randn(m, k, generator=gen), torch.randn(m, k, generator=gen)
    norm_w = torch.rand(k, generator=gen) + 0.5
    out, new_residual = gemv(x, packed, norm_weight=norm_w, eps=1e-6, residual=residual,
                             gated=gated, weight_scale=scale, weight_zero=zero,
                             group_size=group)  # fmt: skip
    h = x + residual
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * norm_w
    ref = normed @ schemes.dequantize_int4(packed, scale, zero).T
    if gated:
        gate, up = ref.chunk(2, dim=-1)
        ref = torch.nn.functional.silu(gate) * up
    assert torch.equal(new_residual, h)
    assert _relative_error(out, ref) < 1e-5


def test_gemv_refuses_scales_of_the_wrong_shape(gen):
    q, scale = schemes.quantize_int8(_weights(8, 64, gen))
    with pytest.raises(ValueError, match="weight_scale"):
        gemv(torch.randn(1, 64), q, weight_scale=scale[:4], config=CONFIG)
