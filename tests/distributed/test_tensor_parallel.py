"""Tensor parallelism on CPUs (gloo, 2 processes): greedy tokens identical to one rank."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from soberana import LLM, SamplingParams
from soberana.distributed.sharding import check_tensor_parallel, plan_shard
from soberana.models.config import ModelConfig
from soberana.models.loader import read_model_config

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))
from tiny_models import build_tiny_model, prompts_of_lengths  # noqa: E402

# name: (tiny_models architecture, config fields replaced). 935 tokens: the vocabulary is
# padded to 936 for two ranks.
CASES = {
    "llama": ("llama", {}),  # 2 KV heads over 2 ranks: one each
    "qwen2-kv1": ("qwen2", {"num_key_value_heads": 1}),  # 1 KV head over 2 ranks: replicated
    "qwen3": ("qwen3", {}),  # q/k norms
    "mistral-kv1-tied": ("mistral", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
}
# Local KV heads are 1 in every case: 2 layers x 2 (K, V) x 16 slots x 16 dims x 4 bytes.
_BLOCK_BYTES = 2 * 2 * 16 * 16 * 4
_BLOCKS = 12  # too few for the three sequences to finish: preemption


def _build(out: Path, name: str) -> Path:
    arch, fields = CASES[name]
    return build_tiny_model(out, arch, vocab_size=935, **fields)


def _run(path: Path, tp: int) -> tuple[list[list[int]], object]:
    # 935 tokens: the vocabulary is padded to 936 for two ranks. A 32-token budget chunks the
    # prefills; 12 blocks preempt; the second round shares the first prompt's prefix.
    llm = LLM(str(path), dtype="float32", max_model_len=128, max_num_batched_tokens=32,
              kv_cache_gb=_BLOCKS * _BLOCK_BYTES * (1 if tp > 1 else 2) / 1e9,
              tensor_parallel_size=tp)
    try:
        greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        first = prompts_of_lengths([60, 50, 45], vocab=935)
        tokens = [o.outputs[0].token_ids for o in llm.generate(first, greedy)]
        again = [first[0][:48] + [7, 8, 9], first[1]]
        tokens += [o.outputs[0].token_ids for o in llm.generate(again, greedy)]
        return tokens, llm.engine.get_stats()
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_tokens_match_one_rank(tmp_path, name):
    path = _build(tmp_path, name)
    expected, _ = _run(path, 1)
    tokens, stats = _run(path, 2)
    assert tokens == expected
    assert stats.num_preemptions > 0
    assert stats.prefix_cache_hits > 0


def _tiny_config(heads: int, kv_heads: int, intermediate: int = 128) -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=100, hidden_size=64,
                       intermediate_size=intermediate, num_layers=1, num_heads=heads,
                       num_kv_heads=kv_heads, head_dim=64 // heads, rms_norm_eps=1e-6,
                       max_position_embeddings=64)


def test_kv_heads_replicated_when_fewer_than_ranks():
    cfg = _tiny_config(8, 2)
    shards = [plan_shard(cfg, r, 4) for r in range(4)]
    assert [s.kv_head_start for s in shards] == [0, 0, 1, 1]
    assert {(s.num_heads, s.num_kv_heads) for s in shards} == {(2, 1)}
    # query heads 2r, 2r+1 read KV head (2r) // 4 of the full model: the rank's one KV head
    assert all((2 * r) // 4 == s.kv_head_start for r, s in enumerate(shards))
    assert [s.vocab_start for s in shards] == [0, 25, 50, 75]


@pytest.mark.parametrize("heads, kv, tp, needle", [
    (4, 2, 3, "4 attention heads"),
    (6, 6, 4, "6 attention heads"),
    (8, 3, 2, "3 KV heads"),
])
def test_unsupported_shapes_are_named(heads, kv, tp, needle):
    with pytest.raises(ValueError, match=needle):
        check_tensor_parallel(_tiny_config(heads, kv), tp)


def test_engine_refuses_indivisible_heads_before_starting_workers(tmp_path):
    path = _build(tmp_path, "llama")
    assert read_model_config(path)[0].num_heads == 4
    with pytest.raises(ValueError, match="tensor_parallel_size 3 must divide"):
        LLM(str(path), dtype="float32", max_model_len=64, tensor_parallel_size=3)

