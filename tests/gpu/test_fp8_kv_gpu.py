"""`--kv-cache-dtype fp8` on a GPU: the Triton kernels store keys/values as float8_e4m3fn
(bit for bit what the CPU path stores) and attend over them in bf16; the engine serves a
model with twice the KV blocks in the same pool, CUDA graphs on."""

import os

import pytest
import torch

pytestmark = pytest.mark.gpu

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


def test_reshape_and_cache_stores_what_the_cpu_path_stores():
    fp8 = torch.float8_e4m3fn
    k_cache = torch.zeros(64, 16, 8, 128, dtype=fp8, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    key = torch.randn(300, 8, 128, device="cuda", dtype=torch.bfloat16) * 50
    value = torch.randn(300, 8, 128, device="cuda", dtype=torch.bfloat16) * 1e-3
    slots = torch.randperm(64 * 16, device="cuda")[:300]
    reshape_and_cache(key, value, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, 8, 128)[slots], v_cache.view(-1, 8, 128)[slots]
    for name, stored, x in (("key", flat_k, key), ("value", flat_v, value)):
        want = to_kv_cache_dtype(x, fp8)
        bad = (stored.view(torch.uint8) != want.view(torch.uint8)).nonzero()[:5].tolist()
        assert not bad, f"{name}: " + "; ".join(
            f"{x[tuple(i)].item()!r} stored {stored[tuple(i)].float().item()!r}, "
            f"expected {want[tuple(i)].float().item()!r}" for i in bad)


@pytest.mark.parametrize("queries", [[1, 1, 1, 1], [700, 33, 1, 250]])
def test_attention_over_an_fp8_cache_equals_the_rounded_reference(queries):
    seed = int.from_bytes(os.urandom(4), "little")
    step = make_step([700, 900, 4000, 250], queries, num_heads=32, num_kv_heads=8, head_dim=128,
                     block_size=16, dtype=torch.bfloat16, device="cuda",
                     generator=torch.Generator().manual_seed(seed))  # fmt: skip
    step = with_fp8_cache(step)
    out = triton_paged_attention(step.q, step.k_cache, step.v_cache, step.meta, step.scale)
    assert relative_error(out, reference_attention(step)) < 1e-2, f"seed {seed}"


def _logprob_gaps(a, b, topk):
    """vLLM's check_logprobs_close, for one pair of greedy outputs: at each position, the
    largest logprob gap over the tokens both top-k lists hold; at the first position where the
    two choose differently, each choice must be in the other's top-k (a near-tie that rounding
    flipped), and the comparison stops there."""
    gaps = []
    for pos, (ta, tb, la, lb) in enumerate(zip(a.token_ids, b.token_ids, a.logprobs,
                                               b.logprobs, strict=True)):
        shared = la.keys() & lb.keys()
        assert len(shared) >= topk // 2, (pos, sorted(la), sorted(lb))
        gaps.append(max(abs(la[t].logprob - lb[t].logprob) for t in shared))
        if ta != tb:
            assert ta in lb and tb in la, (pos, ta, tb)
            break
    return gaps


@pytest.mark.xfail(strict=True, raises=ValueError, reason="the engine refuses FP8 KV on GPUs "
                   "(soberana/engine/worker.py) until this test passes on one")  # fmt: skip
def test_engine_serves_fp8_kv_with_twice_the_blocks():
    """The Triton engine with an FP8 cache (CUDA graphs, fused decode) gives the tokens and
    logprobs of the PyTorch path over the same FP8 cache, in twice the blocks of a bf16 cache.

    The model is the random-weights demo (the GPU machine has no real weights) in float32.
    The two paths compute keys and values to float32 rounding, but one that lands on the
    other side of an FP8 rounding boundary moves by a whole FP8 step, and that noise grows
    over the steps: on CPU, with SmolLM2's real weights, the native and PyTorch paths over an
    FP8 cache differ by up to 0.3 in a top-5 logprob within 24 tokens (FP8 against a float32
    cache: up to 0.9), and by 5e-5 over a float32 cache. Hence the bounds: the first token
    (prefill) within 1e-2, no position beyond 1.0, the mean gap below 0.3, vLLM's rule at the
    first different token. A wrong FP8 write or read moves logprobs by whole nats."""
    from soberana import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land",
               "SELECT name FROM users WHERE", "1, 2, 3, 5, 8, 13,", "Dear Sir or Madam,"]
    runs = {}
    for kv, backend in (("auto", "auto"), ("fp8", "auto"), ("fp8", "torch")):
        llm = LLM(None, kv_cache_dtype=kv, kv_cache_gb=0.5, max_model_len=512, max_num_seqs=8,
                  compute_backend=backend, dtype="float32")
        runs[kv, backend] = (llm.engine.model_info.num_blocks,
                             [o.outputs[0] for o in llm.generate(prompts, params,
                                                                  use_tqdm=False)])
        assert llm.engine.model_info.kv_cache_dtype == kv
        del llm
        torch.cuda.empty_cache()
    blocks_auto, _ = runs["auto", "auto"]
    blocks_fp8, triton = runs["fp8", "auto"]
    assert blocks_fp8 >= 2 * blocks_auto - 1
    _, torch_path = runs["fp8", "torch"]
    gaps = [_logprob_gaps(a, b, topk=5) for a, b in zip(triton, torch_path, strict=True)]
    assert all(g[0] < 1e-2 for g in gaps), [g[0] for g in gaps]
    flat = [x for g in gaps for x in g]
    assert max(flat) < 1.0 and sum(flat) / len(flat) < 0.3, [max(g) for g in gaps]
    assert len(flat) >= len(prompts) * 24 // 2, [len(g) for g in gaps]
