"""Each weight format's arithmetic, and each linear method against `x @ dequantize(W).T`."""

import pytest
import torch

from soberana.quantization import QuantizationConfig, QuantLinear, schemes


@pytest.fixture
def w():
    return torch.randn(96, 256, generator=torch.Generator().manual_seed(0)) * 0.05


def _relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_int8_round_trip_error_is_within_half_a_step_per_channel(w):
    q, scale = schemes.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (96,)
    err = (schemes.dequantize_int8(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()


def test_int4_packs_two_values_per_byte_and_round_trips_within_half_a_step(w):
    packed, scale, zero = schemes.quantize_int4(w, 128)
    assert packed.shape == (96, 128) and packed.dtype == torch.uint8
    assert scale.shape == zero.shape == (96, 2)
    q = schemes.unpack_int4(packed)
    assert q.max() <= 15 and torch.equal(schemes.pack_int4(q), packed)
    err = (schemes.dequantize_int4(packed, scale, zero) - w).abs().reshape(96, 2, 128)
    assert (err <= scale[..., None] / 2 + 1e-6).all()


def test_int4_keeps_zero_exact(w):
    w[:, :128] = 0.0
    packed, scale, zero = schemes.quantize_int4(w, 128)
    assert (schemes.dequantize_int4(packed, scale, zero)[:, :128] == 0).all()


def test_int4_group_falls_back_to_a_divisor_of_the_input_size():
    assert schemes.group_size_for(576) == 64  # SmolLM2's hidden size
    assert schemes.group_size_for(4096) == 128
    assert schemes.group_size_for(688) == 16  # the demo model's intermediate size
    with pytest.raises(ValueError, match="divisible by 16"):
        schemes.group_size_for(100)


def test_fp8_round_trip_relative_error_is_below_e4m3_precision(w):
    q, scale = schemes.quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn
    assert _relative_error(schemes.dequantize_fp8(q, scale), w) < 2**-4


def test_per_token_activation_scales_bound_each_row():
    x = torch.randn(5, 64) * torch.tensor([1.0, 10, 100, 1000, 0.01])[:, None]
    q, scale = schemes.quantize_fp8_per_token(x)
    assert scale.shape == (5, 1)
    assert _relative_error(q.float() * scale, x) < 2**-4


@pytest.mark.parametrize("method", ["int8", "int8_w8a16", "int4", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_quant_linear_equals_dequantized_reference(method, dtype, rows, w):
    """Weight-only schemes against `x @ dequantize(W).T`; int8 where the CPU's W8A8 kernel
    serves it against the reference that quantizes the activations the same way."""
    layer = QuantLinear(256, 96, True, QuantizationConfig.named(method).linear_method(), dtype)
    layer.weight_loader(w[:40], 0)  # two shards, as a fused projection is loaded
    layer.weight_loader(w[40:], 40)
    with torch.no_grad():
        layer.bias.copy_(torch.linspace(-1, 1, 96))
    layer.finalize()
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
    if method == "int8" and layer.method.w8a8(layer):
        ref = schemes.int8_w8a8_reference(x, *layer.method.quantized(layer), layer.bias)
    else:
        assert method != "int8_w8a16" or not layer.method.w8a8(layer)
        ref = x.float() @ layer.method.dequantize(layer).T + layer.bias.float()
    out = layer(x)
    assert out.dtype == dtype and out.shape == (rows, 96)
    # exact up to accumulation order (and, in bfloat16, the rounding of inputs and output)
    assert _relative_error(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_quantized_weights_are_close_to_the_float_ones(w):
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(2))
    for method, bound in (("int8", 0.01), ("fp8", 0.05), ("int4", 0.15)):
        layer = QuantLinear(256, 96, False, QuantizationConfig(method).linear_method())
        layer.weight_loader(w)
        layer.finalize()
        assert _relative_error(layer(x), x @ w.T) < bound, method


def test_weight_loader_refuses_rows_that_do_not_fit(w):
    layer = QuantLinear(256, 96, False, QuantizationConfig("int8").linear_method())
    with pytest.raises(ValueError, match="do not fit"):
        layer.weight_loader(w, 10)
