"""int8 quantization under tensor parallelism (CPU, gloo, 2 processes): each rank quantizes
its shard at load; greedy tokens equal one rank's int8 engine, weight-only (int8_w8a16) and
with CPUs' default W8A8 (activations int8 per block of 32: a row-parallel shard of these
models' widths splits at a block boundary, so the blocks are the same)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from soberana import LLM, SamplingParams

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))
from tiny_models import build_tiny_model, prompts_of_lengths  # noqa: E402

CASES = {
    "llama": ("llama", {}),
    "qwen2-kv1": ("qwen2", {"num_key_value_heads": 1}),  # q/k/v biases, replicated KV head
}


def _generate(path: Path, tp: int, quantization: str | None) -> tuple[list[list[int]], object]:
    # the vocabulary-parallel head stays in the model dtype: the one-rank engine is compared
    # with its head so too (its CPU default quantizes it with int8)
    head = {"lm_head_quantized": False} if quantization is not None else {}
    llm = LLM(str(path), dtype="float32", max_model_len=128, max_num_batched_tokens=32,
              tensor_parallel_size=tp, quantization=quantization, **head)
    try:
        out = llm.generate(prompts_of_lengths([40, 23, 57], seed=11, vocab=935),
                           SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        return [o.outputs[0].token_ids for o in out], llm.engine.model_info
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("scheme", ["int8_w8a16", "int8"])
@pytest.mark.parametrize("name", list(CASES))
def test_int8_greedy_tokens_match_one_rank_int8(tmp_path, name, scheme):
    arch, fields = CASES[name]
    path = build_tiny_model(tmp_path, arch, vocab_size=935, **fields)
    expected, info_1 = _generate(path, 1, scheme)
    if scheme == "int8_w8a16":  # (W8A8 happens to keep these tiny models' greedy tokens)
        unquantized, _ = _generate(path, 1, None)
        assert expected != unquantized  # int8 changes this model's tokens: the test can tell
    tokens, info_2 = _generate(path, 2, scheme)
    assert tokens == expected
    assert info_2.quantization == info_1.quantization
    assert info_2.quantization_kernels


def test_a_quantized_head_is_refused_before_workers_start(tmp_path):
    path = build_tiny_model(tmp_path, "llama", vocab_size=935)
    with pytest.raises(ValueError, match="lm_head_quantized is not supported with "
                                         "tensor_parallel_size > 1"):
        LLM(str(path), dtype="float32", max_model_len=64, tensor_parallel_size=2,
            quantization="int8", lm_head_quantized=True)


@pytest.mark.parametrize("method", ["int4", "fp8"])
def test_other_schemes_are_refused_before_workers_start(tmp_path, method):
    path = build_tiny_model(tmp_path, "llama", vocab_size=935)
    with pytest.raises(ValueError, match=f"quantization {method} .* not supported with "
                                         "tensor_parallel_size > 1"):
        LLM(str(path), dtype="float32", max_model_len=64, tensor_parallel_size=2,
            quantization=method)
