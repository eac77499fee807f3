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
    llm = LLM(str(path), dtype="float32", max_model_len=128, max_num_batched_tokens=32,
              tensor_parallel_size=tp, quantization=quantization)
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


# int4's groups of 128 inputs need row-parallel shards (o_proj: 256 / 2, down_proj: 512 / 2)
# of whole groups: wider than the other tests' models (64 / 2 and 128 / 2).
WIDE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4}


@pytest.mark.parametrize("name", list(CASES))
def test_int4_greedy_tokens_match_one_rank_int4(tmp_path, name):
    """Each rank quantizes only its columns of o_proj / down_proj (whole groups of 128), so
    its int4 values, scales and zero points are the one-rank engine's; only the float
    summation order of the row-parallel all-reduce differs."""
    arch, fields = CASES[name]
    path = build_tiny_model(tmp_path, arch, vocab_size=935, **WIDE, **fields)
    expected, info_1 = _generate(path, 1, "int4")
    if name == "llama":
        unquantized, _ = _generate(path, 1, None)
        assert expected != unquantized  # int4 changes this model's tokens: the test can tell
    tokens, info_2 = _generate(path, 2, "int4")
    assert tokens == expected
    assert info_2.quantization == info_1.quantization


@pytest.mark.parametrize("name", list(CASES))
def test_fp8_greedy_tokens_match_one_rank_fp8(tmp_path, name):
    """fp8 (weight-only on CPUs): per-row scales over whole rows, as int8."""
    arch, fields = CASES[name]
    path = build_tiny_model(tmp_path, arch, vocab_size=935, **fields)
    expected, info_1 = _generate(path, 1, "fp8")
    tokens, info_2 = _generate(path, 2, "fp8")
    assert tokens == expected
    assert info_2.quantization == info_1.quantization


def test_int4_shard_that_would_cut_a_group_is_refused_before_workers_start(tmp_path):
    # o_proj's 64 inputs take int4 groups of 64 (schemes.int4_group_for): 2 shards of 32
    path = build_tiny_model(tmp_path, "llama", vocab_size=935)
    with pytest.raises(ValueError, match=r"int4 .*tensor_parallel_size 2: o_proj is split along "
                                         r"its 64 inputs into shards of 32, which would cut its "
                                         r"groups of 64 inputs"):
        LLM(str(path), dtype="float32", max_model_len=64, tensor_parallel_size=2,
            quantization="int4")
