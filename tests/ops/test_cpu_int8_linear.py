"""soberana's int8 weight-only CPU linear (csrc/linear_int8.c) against `x @ dequantize(W).T`,
on the native build and, on a CPU with AVX-512, the AVX2 + FMA build (cpu_isa)."""

import pytest
import torch

from soberana.quantization import QuantizationConfig, QuantLinear, cpu_int8, schemes

# (N, K): SmolLM2's projections (q/k/v fused 960 x 576, down 576 x 1536), and shapes with a
# partial last panel (70 = 64 + 6) and a partial quarter panel (100 = 64 + 36).
SHAPES = [(960, 576), (576, 1536), (70, 34), (100, 64)]
# one row (the decode GEMV), one partial tile, one whole tile, several (the panel copy), and
# enough for both threads to take panels and rows
ROWS = [1, 5, 6, 13, 64]


def _relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def weights():
    gen = torch.Generator().manual_seed(0)
    return {shape: torch.randn(*shape, generator=gen) * shape[1] ** -0.5 for shape in SHAPES}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_kernel_equals_dequantized_reference(cpu_isa, weights, shape, dtype):
    n, k = shape
    q, scale = schemes.quantize_int8(weights[shape])
    blob = cpu_int8.pack(q, scale)
    if blob is None:
        pytest.skip(f"no int8 kernel in the {cpu_isa} build on this CPU")
    got_q, got_scale = cpu_int8.unpack(blob, n, k)
    assert torch.equal(got_q, q) and torch.equal(got_scale, scale)
    bias = torch.linspace(-1, 1, n)
    ref_w = schemes.dequantize_int8(q, scale)
    gen = torch.Generator().manual_seed(1)
    for rows in ROWS:
        x = torch.randn(rows, k, generator=gen).to(dtype)
        out = cpu_int8.linear(x, blob, n, cpu_int8.pad_bias(bias, torch.bfloat16),
                              cpu_int8.pad_bias(bias, torch.float32))  # fmt: skip
        assert out is not None and out.dtype == dtype and out.shape == (rows, n)
        ref = x.float() @ ref_w.T + bias
        # exact products; the float32 sums differ only in order (and bfloat16 rounds once)
        bound = 1e-6 if dtype == torch.float32 else 4e-3
        assert _relative_error(out, ref) < bound, rows
        assert (out.float() - ref).abs().max() <= bound * 4 * ref.abs().max(), rows


def test_int8_layer_serves_from_the_blob_alone(cpu_isa, weights):
    w = weights[(960, 576)]
    layer = QuantLinear(576, 960, True, QuantizationConfig("int8").linear_method(), torch.bfloat16)
    layer.weight_loader(w)
    with torch.no_grad():
        layer.bias.copy_(torch.linspace(-1, 1, 960))
    layer.finalize()
    if cpu_int8.library() is None:
        pytest.skip(f"no int8 kernel in the {cpu_isa} build on this CPU")
    assert layer.weight is None and layer.native is not None  # int8 bytes held once
    assert "soberana int8 CPU kernel" in layer.kernel
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    ref = x.float() @ layer.method.dequantize(layer).T + layer.bias.float()
    assert _relative_error(layer(x), ref) < 4e-3
    assert _relative_error(layer.method.dequantize(layer), w) < 0.01


def test_packing_refuses_an_odd_input_size():
    q, scale = schemes.quantize_int8(torch.randn(8, 33))
    assert cpu_int8.pack(q, scale) is None  # the layer keeps PyTorch's path
