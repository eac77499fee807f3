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
from tests.ops.quant_cases import tie_rows  # noqa: E402


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


# (quantized dtype, inputs per scale): fp8 per row; int8 per row and per group of 128 / 16
QUANT_CASES = [(torch.float8_e4m3fn, None), (torch.int8, None), (torch.int8, 128),
               (torch.int8, 16)]  # fmt: skip


def _reference(qdtype, x, group):
    if qdtype == torch.float8_e4m3fn:
        return schemes.quantize_fp8_per_token(x)
    return schemes.quantize_int8_per_token(x, group)


@pytest.mark.parametrize("qdtype,group", QUANT_CASES)
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
# K in one tile (ragged, and Llama-3.1-8B's hidden size) and K over 16384 (read twice per row)
@pytest.mark.parametrize("m,k", [(5, 384), (3, 4096), (2, 20480)])
def test_per_token_quant_equals_torch_reference_bit_for_bit(qdtype, group, xdtype, m, k, gen):
    from soberana.ops.triton.per_token_quant import per_token_quant

    # rows from 1e-4 to 1e3 in magnitude; a row of zeros; a signed zero
    x = torch.randn(m, k, generator=gen) * torch.logspace(-4, 3, m)[:, None]
    x[-1] = 0.0
    x[0, 0] = -0.0
    x = x.to(xdtype)
    q, scale = per_token_quant(x, qdtype, group)
    ref_q, ref_scale = _reference(qdtype, x, group)
    assert q.dtype == qdtype and scale.dtype == torch.float32
    assert scale.shape == (m, k // (group or k))
    assert torch.equal(scale, ref_scale)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


@pytest.mark.parametrize("qdtype", [torch.float8_e4m3fn, torch.int8])
def test_per_token_quant_breaks_ties_to_even_as_torch_does(qdtype):
    from soberana.ops.triton.per_token_quant import per_token_quant

    fp8 = qdtype == torch.float8_e4m3fn
    x = tie_rows(fp8)
    q, scale = per_token_quant(x, qdtype)
    ref_q, _ = (schemes.quantize_fp8_per_token if fp8 else schemes.quantize_int8_per_token)(x)
    assert torch.equal(scale, torch.ones_like(scale))
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


def test_per_token_quant_refuses_other_dtypes_and_strided_rows():
    from soberana.ops.triton.per_token_quant import per_token_quant

    with pytest.raises(ValueError, match="dtype"):
        per_token_quant(torch.randn(2, 16), torch.uint8)
    with pytest.raises(ValueError, match="contiguous"):
        per_token_quant(torch.randn(16, 2).T, torch.int8)


# M below and above the smallest row tile; ragged N; groups of 128 and of 16 (K = 96)
@pytest.mark.parametrize("m,n,k,group", [(1, 40, 256, 128), (17, 136, 96, 16),
                                         (70, 200, 512, 128)])  # fmt: skip
@pytest.mark.parametrize("bias", [False, True])
def test_int8_w8a8_gemm_equals_integer_reference(m, n, k, group, bias, gen):
    from soberana.ops.triton.quant_gemm import int8_w8a8_matmul

    x = torch.randn(m, k, generator=gen)
    q, scale = schemes.quantize_int8(_weights(n, k, gen))
    b = torch.randn(n, generator=gen) if bias else None
    out = int8_w8a8_matmul(x, q, scale, group, b)
    # each group's int8 products summed exactly, then scaled: float64 here, float32 in the kernel
    xq, x_scale = schemes.quantize_int8_per_token(x, group)
    dots = torch.einsum("mgi,ngi->mng", xq.reshape(m, -1, group).double(),
                        q.reshape(n, -1, group).double())  # fmt: skip
    ref = (dots * x_scale.double()[:, None, :]).sum(-1) * scale.double()
    if bias:
        ref += b.double()
    assert out.dtype == x.dtype and out.shape == (m, n)
    assert ((out.double() - ref).abs().max() / ref.abs().max()).item() < 1e-6
    # and the weight-only reference up to the activations' int8 rounding (~0.3% per value)
    dequant = x @ schemes.dequantize_int8(q, scale).T + (b if bias else 0.0)
    assert _relative_error(out, dequant) < 1e-2


def test_int8_w8a8_gemm_refuses_groups_that_do_not_tile_k(gen):
    from soberana.ops.triton.quant_gemm import int8_w8a8_matmul

    q, scale = schemes.quantize_int8(_weights(40, 96, gen))
    with pytest.raises(ValueError, match="group"):
        int8_w8a8_matmul(torch.randn(20, 96), q, scale, 64)  # does not divide 96
    with pytest.raises(ValueError, match="group"):
        int8_w8a8_matmul(torch.randn(20, 96), q, scale, 24)  # not a multiple of 16
