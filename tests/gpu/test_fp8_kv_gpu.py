"""`--kv-cache-dtype fp8` on a GPU: the Triton kernels store keys/values as float8_e4m3fn
(bit for bit what the CPU path stores) and attend over them in bf16; the engine serves a
model with twice the KV blocks in the same pool, CUDA graphs on."""

import os

import pytest
import torch

pytestmark = pytest.mark.gpu

# The first real-GPU run (one H100, 2026-12-07) failed these; the engine refuses FP8 KV on GPUs
# until they pass. strict: a pass is reported, so the refusal can then be lifted.
FAILED_ON_H100 = pytest.mark.xfail(strict=True, reason="FP8 KV on GPUs: failed on an H100 "
                                   "2026-12-07; the engine refuses it at start")  # fmt: skip
pytest.importorskip("triton")

from soberana.ops.attention import to_kv_cache_dtype  # noqa: E402
from soberana.ops.triton.attention import reshape_and_cache, triton_paged_attention  # noqa: E402
from tests.ops.paged_attention_cases import (  # noqa: E402
    make_step,
    reference_attention,
    relative_error,
    with_fp8_cache,
)


@pytest.fixture(autouse=True)
def _needs_fp8():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 KV needs compute capability >= 8.9")


@FAILED_ON_H100
def test_reshape_and_cache_stores_what_the_cpu_path_stores():
    fp8 = torch.float8_e4m3fn
    k_cache = torch.zeros(64, 16, 8, 128, dtype=fp8, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    key = torch.randn(300, 8, 128, device="cuda", dtype=torch.bfloat16) * 50
    value = torch.randn(300, 8, 128, device="cuda", dtype=torch.bfloat16) * 1e-3
    slots = torch.randperm(64 * 16, device="cuda")[:300]
    reshape_and_cache(key, value, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, 8, 128)[slots], v_cache.view(-1, 8, 128)[slots]
    assert torch.equal(flat_k.view(torch.uint8), to_kv_cache_dtype(key, fp8).view(torch.uint8))
    assert torch.equal(flat_v.view(torch.uint8), to_kv_cache_dtype(value, fp8).view(torch.uint8))


@pytest.mark.parametrize("queries", [[1, 1, 1, 1],
                                     pytest.param([700, 33, 1, 250], marks=FAILED_ON_H100)])
def test_attention_over_an_fp8_cache_equals_the_rounded_reference(queries):
    seed = int.from_bytes(os.urandom(4), "little")
    step = make_step([1, 900, 4000, 250], queries, num_heads=32, num_kv_heads=8, head_dim=128,
                     block_size=16, dtype=torch.bfloat16, device="cuda",
                     generator=torch.Generator().manual_seed(seed))  # fmt: skip
    step = with_fp8_cache(step)
    out = triton_paged_attention(step.q, step.k_cache, step.v_cache, step.meta, step.scale)
    assert relative_error(out, reference_attention(step)) < 1e-2, f"seed {seed}"


@FAILED_ON_H100
def test_engine_serves_fp8_kv_with_twice_the_blocks():
    from soberana import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    runs = {}
    for kv in ("auto", "fp8"):
        llm = LLM(None, kv_cache_dtype=kv, kv_cache_gb=0.5, max_model_len=512, max_num_seqs=8)
        runs[kv] = (llm.engine.model_info.num_blocks,
                    [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        assert llm.engine.model_info.kv_cache_dtype == kv
        del llm
        torch.cuda.empty_cache()
    blocks_auto, tokens_auto = runs["auto"]
    blocks_fp8, tokens_fp8 = runs["fp8"]
    assert blocks_fp8 >= 2 * blocks_auto - 1
    # greedy text of a real model barely moves with fp8 keys/values: the first tokens agree
    assert all(a[:8] == b[:8] for a, b in zip(tokens_auto, tokens_fp8))
