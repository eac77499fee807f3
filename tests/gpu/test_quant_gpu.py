"""The quantized linears on a real GPU, in bfloat16 at Llama-3.1-8B's projection shapes:
Triton int8/int4 GEMM and dequantizing GEMV, FP8 W8A8 through torch._scaled_mm and int8 W8A8
through a Triton GEMM (activations quantized by the Triton per-token kernel), each against
`x @ dequantize(W).T`; and the engine serving a quantized model end to end."""

import pytest
import torch

from soberana.quantization import QuantizationConfig, QuantLinear

pytestmark = pytest.mark.gpu

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # qkv, o, gate_up, down


def _relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _layer(method, n, k):
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    w = torch.randn(n, k, device="cuda", generator=gen) * k**-0.5
    layer = QuantLinear(k, n, False, QuantizationConfig(method).linear_method(), torch.bfloat16)
    layer.to("cuda")
    layer.weight_loader(w)
    layer.finalize()
    return layer


@pytest.mark.parametrize("method", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("rows", [2, 64, 300])
@pytest.mark.parametrize("shape", SHAPES)
def test_batched_quant_linear_equals_dequantized_reference(method, rows, shape):
    n, k = shape
    if method == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMM needs compute capability >= 8.9")
    layer = _layer(method, n, k)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ layer.method.dequantize(layer).T
    # fp8 W8A8 also rounds the activations to e4m3 (per-token scales): ~2^-4 relative per value;
    # int8 steps of more rows than the GEMV takes round them to int8 per group of 128:
    # ~0.67% on Gaussian rows (float64 on a CPU, bf16 output)
    bound = 4e-2 if method == "fp8" else 1.5e-2 if method == "int8" and rows > 8 else 1e-2
    assert _relative_error(layer(x), ref) < bound


@pytest.mark.parametrize("method", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("shape", SHAPES)
def test_gemv_over_quantized_weights_equals_dequantized_reference(method, shape):
    from soberana.ops.layers import gemv_linear
    from soberana.ops.triton.gemv import gemv

    n, k = shape
    layer = _layer(method, n, k)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    out, _ = gemv_linear(gemv, x, layer)
    ref = x.float() @ layer.method.dequantize(layer).T
    assert _relative_error(out, ref) < 1e-2


@pytest.mark.parametrize("method", ["int8", "int4", "fp8"])
def test_engine_serves_a_quantized_model_with_cuda_graphs(method):
    from soberana import LLM, SamplingParams

    llm = LLM(None, quantization=method, max_model_len=256, max_num_seqs=8)
    info = llm.engine.model_info
    assert info.quantization.startswith(method) and info.quantization_kernels
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    single = llm.generate(["hello there"], params, use_tqdm=False)[0].outputs[0].token_ids
    assert len(single) == 16
    del llm
    torch.cuda.empty_cache()


@pytest.mark.parametrize("qdtype,group", [(torch.float8_e4m3fn, None), (torch.int8, 128),
                                         (torch.int8, None)])  # fmt: skip
@pytest.mark.parametrize("rows", [1, 300, 512])
@pytest.mark.parametrize("k", [4096, 14336, 20480])  # hidden, MLP width, one over a tile
def test_per_token_quant_kernel_equals_torch_reference_bit_for_bit(qdtype, group, rows, k):
    """The compiled kernel (div_rn, the float32 rounding onto the grid, the hardware cast)
    against the eager chain on the same GPU, in bfloat16 as the model feeds it."""
    from soberana.ops.triton.per_token_quant import per_token_quant
    from soberana.quantization import schemes

    gen = torch.Generator(device="cuda").manual_seed(rows + k)
    x = torch.randn(rows, k, device="cuda", generator=gen)
    x = (x * torch.logspace(-3, 2, rows, device="cuda")[:, None]).to(torch.bfloat16)
    q, scale = per_token_quant(x, qdtype, group)
    ref_q, ref_scale = (schemes.quantize_fp8_per_token(x) if qdtype == torch.float8_e4m3fn
                        else schemes.quantize_int8_per_token(x, group))  # fmt: skip
    assert torch.equal(scale, ref_scale)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


@pytest.mark.parametrize("qdtype", [torch.float8_e4m3fn, torch.int8])
def test_per_token_quant_kernel_breaks_ties_as_torch_does(qdtype):
    from soberana.ops.triton.per_token_quant import per_token_quant
    from soberana.quantization import schemes
    from tests.ops.quant_cases import tie_rows

    fp8 = qdtype == torch.float8_e4m3fn
    x = tie_rows(fp8).cuda()
    q, scale = per_token_quant(x, qdtype)
    ref_q, _ = schemes.quantize_fp8_per_token(x) if fp8 else schemes.quantize_int8_per_token(x)
    assert torch.equal(scale, torch.ones_like(scale))
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


@pytest.mark.parametrize("rows", [9, 64, 300, 512])
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_w8a8_gemm_equals_integer_reference(rows, shape):
    """The compiled int8 tl.dot per group of 128 against the exact integer products of the
    same int8 operands, scaled in float64; and the layer's batched steps take this path."""
    from soberana.ops.triton.quant_gemm import int8_w8a8_matmul
    from soberana.quantization import schemes

    n, k = shape
    layer = _layer("int8", n, k)
    assert layer.act_group == 128
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    out = int8_w8a8_matmul(x, layer.weight, layer.weight_scale, 128)
    xq, x_scale = schemes.quantize_int8_per_token(x, 128)
    ref = torch.zeros(rows, n, dtype=torch.float64, device="cuda")
    for g in range(k // 128):
        cols = slice(g * 128, (g + 1) * 128)
        ref += (xq[:, cols].double() @ layer.weight[:, cols].double().T) * x_scale[:, g:g + 1]
    ref *= layer.weight_scale.double()
    assert _relative_error(out, ref) < 4e-3  # bfloat16 output rounding (2^-9 per value)
    assert torch.equal(layer(x), out)


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_w8a8_batched_step_is_faster_than_bf16(method):
    """The point of W8A8: a 512-token gate_up projection at Llama-3.1-8B's shape beats the
    bf16 GEMM (the numbers are printed for the session notes)."""
    from triton.testing import do_bench

    if method == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMM needs compute capability >= 8.9")
    n, k = 28672, 4096
    layer = _layer(method, n, k)
    x = torch.randn(512, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    bf16_ms = do_bench(lambda: x @ w.T, warmup=25, rep=200, return_mode="median")
    quant_ms = do_bench(lambda: layer(x), warmup=25, rep=200, return_mode="median")
    print(f"{method} 512x{k}x{n}: {quant_ms:.3f} ms vs bf16 {bf16_ms:.3f} ms")
    assert quant_ms < bf16_ms
