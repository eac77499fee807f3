"""The quantized linears on a real GPU, in bfloat16 at Llama-3.1-8B's projection shapes:
Triton int8/int4 GEMM and dequantizing GEMV, FP8 W8A8 through torch._scaled_mm, each against
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
    # fp8 W8A8 also rounds the activations to e4m3 (per-token scales): ~2^-4 relative per value
    bound = 4e-2 if method == "fp8" else 1e-2
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
