"""soberana's int8 CPU linears (csrc/linear_int8.c) on the native build and, on a CPU with
AVX-512, the AVX2 build (cpu_isa):
- W8A8 (activations quantized per block of 32) against the PyTorch reference that quantizes
  the activations the same way, multiplies in integers and scales (exact up to the order of
  the float32 sum over blocks);
- W8A16 against `x @ dequantize(W).T` (exact products, float32 sums in another order)."""

import pytest
import torch

from soberana.ops.cpu import linear_int8
from soberana.quantization import QuantizationConfig, QuantLinear, schemes

# (N, K): SmolLM2's projections (q/k/v fused 960 x 576, down 576 x 1536), and shapes with a
# partial last panel (70 = 64 + 6) and a partial quarter panel (100 = 64 + 36).
SHAPES = [(960, 576), (576, 1536), (70, 64), (100, 96)]
# one row (the decode GEMV), partial tiles of both kernels, whole tiles, several (the panel
# copy), enough for both threads to take panels and rows, and enough for threads to claim
# chunks of rows (a weight that fits L2, 16 chunks of whole tiles)
ROWS = [1, 2, 5, 6, 13, 64, 400]


def _relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _kernel(name, cpu_isa):
    kernel = linear_int8.int8_kernels().get(name)
    if kernel is None:
        pytest.skip(f"no int8 {name} kernel in the {cpu_isa} build on this CPU")
    return kernel


@pytest.fixture(scope="module")
def weights():
    gen = torch.Generator().manual_seed(0)
    return {shape: torch.randn(*shape, generator=gen) * shape[1] ** -0.5 for shape in SHAPES}


def _activations(rows, k, dtype, gen):
    x = torch.randn(rows, k, generator=gen)
    x[:, 3] *= 40  # an outlier channel, as real activations have: its block's scale only
    x[0, 32:64] = 0  # a block of zeros (scale 0)
    return x.to(dtype)


def _packed(kernel, w):
    """`w` quantized to int8 and packed for `kernel`; the packing must unpack to the same."""
    q, scale = schemes.quantize_int8(w)
    blob = kernel.pack(q, scale)
    got_q, got_scale = kernel.unpack(blob, *w.shape)
    assert torch.equal(got_q, q) and torch.equal(got_scale, scale)
    return q, scale, blob


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_w8a8_kernel_equals_the_integer_reference(cpu_isa, weights, shape, dtype):
    kernel = _kernel("w8a8", cpu_isa)
    n, k = shape
    q, scale, blob = _packed(kernel, weights[shape])
    bias = torch.linspace(-1, 1, n)
    gen = torch.Generator().manual_seed(1)
    for rows in ROWS:
        x = _activations(rows, k, dtype, gen)
        out = kernel.linear(x, blob, n, kernel.prepare_bias(bias, dtype))
        assert out.dtype == dtype and out.shape == (rows, n)
        ref = schemes.int8_w8a8_reference(x, q, scale, bias)
        # integer dot products are exact: only the float32 sum over the k/32 blocks has an
        # order (float32 outputs), and bfloat16 rounds once. One activation quantized
        # differently would move a sum by ~1/127 of a block's share, far above these bounds.
        bound = 1e-6 if dtype == torch.float32 else 4e-3
        err = (out.float() - ref).abs().max() / ref.abs().max()
        assert err < bound, rows


def test_w8a8_is_close_to_the_float_product(cpu_isa, weights):
    """The activation rounding W8A8 adds to weight-only int8, on SmolLM2's down projection."""
    kernel = _kernel("w8a8", cpu_isa)
    w = weights[(576, 1536)]
    q, scale = schemes.quantize_int8(w)
    x = _activations(8, 1536, torch.float32, torch.Generator().manual_seed(2))
    out = kernel.linear(x, kernel.pack(q, scale), 576, None)
    assert _relative_error(out, x @ schemes.dequantize_int8(q, scale).T) < 0.01
    assert _relative_error(out, x @ w.T) < 0.015


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_w8a16_kernel_equals_dequantized_reference(cpu_isa, weights, shape, dtype):
    kernel = _kernel("w8a16", cpu_isa)
    n, k = shape
    q, scale, blob = _packed(kernel, weights[shape])
    bias = torch.linspace(-1, 1, n)
    ref_w = schemes.dequantize_int8(q, scale)
    gen = torch.Generator().manual_seed(1)
    for rows in ROWS:
        x = torch.randn(rows, k, generator=gen).to(dtype)
        out = kernel.linear(x, blob, n, kernel.prepare_bias(bias, dtype))
        assert out.dtype == dtype and out.shape == (rows, n)
        ref = x.float() @ ref_w.T + bias
        # exact products; the float32 sums differ only in order (and bfloat16 rounds once)
        bound = 1e-6 if dtype == torch.float32 else 4e-3
        assert _relative_error(out, ref) < bound, rows
        assert (out.float() - ref).abs().max() <= bound * 4 * ref.abs().max(), rows


@pytest.mark.parametrize("quantization", ["int8", "int8_w8a16"])
def test_int8_layer_takes_its_kernel_at_load_and_serves_from_the_blob(cpu_isa, weights,
                                                                      quantization):  # fmt: skip
    w = weights[(960, 576)]
    method = QuantizationConfig.named(quantization).linear_method()
    layer = QuantLinear(576, 960, True, method, torch.bfloat16)
    layer.weight_loader(w)
    with torch.no_grad():
        layer.bias.copy_(torch.linspace(-1, 1, 960))
    layer.finalize()
    kernels = linear_int8.int8_kernels()
    want = "w8a8" if quantization == "int8" and "w8a8" in kernels else "w8a16"
    if want not in kernels:
        pytest.skip(f"no int8 kernel in the {cpu_isa} build on this CPU")
    assert layer.weight is None and layer.native is not None  # int8 bytes held once
    assert layer.kernel == kernels[want].name
    assert method.w8a8(layer) == (want == "w8a8")
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    q, scale = layer.method.quantized(layer)
    if want == "w8a8":
        ref = schemes.int8_w8a8_reference(x, q, scale, layer.bias)
        assert (layer(x).float() - ref).abs().max() <= 4e-3 * ref.abs().max()
    else:
        ref = x.float() @ layer.method.dequantize(layer).T + layer.bias.float()
        assert _relative_error(layer(x), ref) < 4e-3
    assert _relative_error(layer.method.dequantize(layer), w) < 0.01


def test_sizes_a_kernel_cannot_take_fall_back_at_load():
    """K odd: neither kernel packs it (PyTorch's path); K even but not a multiple of 32: the
    W8A16 kernel serves an int8 layer instead of W8A8."""
    q, scale = schemes.quantize_int8(torch.randn(8, 33))
    for kernel in linear_int8.int8_kernels().values():
        assert kernel.pack(q, scale) is None
    layer = QuantLinear(48, 8, False, QuantizationConfig("int8").linear_method(), torch.bfloat16)
    layer.weight_loader(torch.randn(8, 48))
    layer.finalize()
    assert "W8A8" not in layer.kernel
    x = torch.randn(2, 48).to(torch.bfloat16)
    ref = x.float() @ layer.method.dequantize(layer).T
    assert _relative_error(layer(x), ref) < 4e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_w8a8_gelu_mlp_equals_gelu_between_the_two_linears(cpu_isa, dtype):
    """down(GELU(up(x))) in one call, GELU and the down linear's activation quantization in
    the up linear's last step (MiniLM's MLP, 384 -> 1536 -> 384), against the integer
    reference of the down linear over the float64 GELU of the up linear's float32 output: the
    same integer products; a block whose GELU value (an erf of the kernel's own) lands within
    an ulp of a rounding boundary quantizes one step apart."""
    kernel = _kernel("w8a8", cpu_isa)
    if not linear_int8.w8a8_gelu_mlp_available():
        pytest.skip(f"no fused W8A8 MLP in the {cpu_isa} build on this CPU")
    gen = torch.Generator().manual_seed(3)
    _, _, up = _packed(kernel, torch.randn(1536, 384, generator=gen) * 384**-0.5)
    q, scale, down = _packed(kernel, torch.randn(384, 1536, generator=gen) * 1536**-0.5)
    up_bias, down_bias = torch.linspace(-1, 1, 1536), torch.linspace(-0.5, 0.5, 384)
    for rows in ROWS:
        x = _activations(rows, 384, dtype, gen)
        out = linear_int8.w8a8_gelu_mlp(x, up, kernel.prepare_bias(up_bias, dtype), 1536, down,
                                        kernel.prepare_bias(down_bias, dtype), 384)
        assert out.dtype == dtype and out.shape == (rows, 384)
        h = kernel.linear(x.float(), up, 1536, kernel.prepare_bias(up_bias, torch.float32))
        gelu = torch.nn.functional.gelu(h.double()).float()
        ref = schemes.int8_w8a8_reference(gelu, q, scale, down_bias)
        # float32: 1.3e-7 where no block quantized apart (up to 64 rows), 3.2e-5 at 400 rows
        # (3 rows with a block one step apart); bfloat16 outputs round: 1.7e-3
        bound = 1e-4 if dtype == torch.float32 else 4e-3
        assert _relative_error(out, ref) < bound, rows
        # and the unfused layers (PyTorch's GELU) agree as closely
        unfused = kernel.linear(torch.nn.functional.gelu(h), down, 384,
                                kernel.prepare_bias(down_bias, torch.float32))
        assert _relative_error(out, unfused) < bound, rows
