"""Speculative decoding under tensor parallelism (CPU, gloo, 2 processes): drafts proposed in
the engine core (rank 0), verified through the distributed forward; greedy tokens identical
to one rank without speculation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from soberana import LLM, SamplingParams

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))
from tiny_models import build_tiny_model, prompts_of_lengths  # noqa: E402

NEW = 14
# 1 KV head per rank: 2 layers x (K, V) x 16 slots x 16 dims x 4 bytes.
_RANK_BLOCK_BYTES = 2 * 2 * 16 * 16 * 4


def _prompts() -> list[list[int]]:
    # Repeated segments give prompt lookup something to find.
    a, b, c = prompts_of_lengths([7, 12, 40], seed=3, vocab=935)
    return [a * 4, b + b[:6] + b, c + a + c[:9]]


@pytest.fixture(scope="module")
def model_and_reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    build_tiny_model(path, "llama", vocab_size=935)
    llm = LLM(str(path), dtype="float32", max_model_len=128)
    try:
        out = llm.generate(_prompts(), SamplingParams(temperature=0, max_tokens=NEW,
                                                      ignore_eos=True))
    finally:
        llm.engine.shutdown()
    return path, [o.outputs[0].token_ids for o in out]


@pytest.mark.parametrize("method", ["ngram", "draft_model", "layer_skip"])
def test_greedy_tokens_equal_one_rank_without_speculation(method, model_and_reference):
    path, expected = model_and_reference
    spec = {"method": method, "num_speculative_tokens": 3}
    if method == "draft_model":
        spec["model"] = str(path)  # the target itself, unsharded in the engine core
    if method == "layer_skip":
        spec["num_draft_layers"] = 1
    # 8 blocks preempt; a 32-token budget chunks the prefills and trims drafts to fit.
    llm = LLM(str(path), dtype="float32", max_model_len=128, max_num_batched_tokens=32,
              kv_cache_gb=8 * _RANK_BLOCK_BYTES / 1e9, tensor_parallel_size=2,
              speculative_config=spec)
    try:
        out = llm.generate(_prompts(), SamplingParams(temperature=0, max_tokens=NEW,
                                                      ignore_eos=True))
        stats = llm.engine.get_stats()
    finally:
        llm.engine.shutdown()
    assert [o.outputs[0].token_ids for o in out] == expected
    s = stats.spec_decoding
    assert s.num_draft_tokens > 0 and s.num_accepted_tokens > 0
    if method == "draft_model":  # the same weights draft: every draft is accepted
        assert s.num_accepted_tokens == s.num_draft_tokens
    assert stats.num_preemptions > 0
