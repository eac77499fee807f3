"""Greedy tokens and logprobs equal transformers' on the same weights, for every architecture,
alone or batched, with chunked prefill, under preemption, and on prefix-cache hits."""

from __future__ import annotations

import pytest
import torch

from soberana import LLM, SamplingParams
from tests.engine.tiny_models import ARCHS, hf_greedy, prompts_of_lengths

# Shorter than a block, exactly one and two blocks, and spanning many blocks (block_size 16).
LENGTHS = [1, 5, 16, 32, 37, 64, 100, 203]
NEW_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def references(tiny_models, hf_models):
    prompts = prompts_of_lengths(LENGTHS)
    refs = {arch: [hf_greedy(hf_models(arch), p, NEW_TOKENS) for p in prompts] for arch in ARCHS}
    return prompts, refs


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_batched_greedy_tokens_equal_transformers(arch, tiny_models, references):
    prompts, refs = references
    llm = LLM(str(tiny_models[arch]), max_model_len=512)
    outputs = llm.generate(prompts, GREEDY)
    assert _tokens(outputs) == refs[arch]
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)
    assert [o.prompt_token_ids for o in outputs] == prompts


def test_each_prompt_alone_gives_the_batched_tokens(tiny_models, references):
    prompts, refs = references
    llm = LLM(str(tiny_models["qwen3"]), max_model_len=512, enable_prefix_caching=False)
    for prompt, ref in zip(prompts, refs["qwen3"]):
        assert _tokens(llm.generate([prompt], GREEDY)) == [ref]


@pytest.mark.parametrize("budget", [7, 16])
def test_chunked_prefill_gives_identical_tokens(tiny_models, references, budget):
    prompts, refs = references
    llm = LLM(str(tiny_models["llama31"]), max_model_len=512, max_num_batched_tokens=budget)
    assert _tokens(llm.generate(prompts, GREEDY)) == refs["llama31"]


def test_tiny_kv_pool_preempts_and_still_gives_identical_tokens(tiny_models, hf_models):
    # Five prompts fit the pool at admission (16 blocks); their 40-token answers do not (31).
    prompts = prompts_of_lengths([5, 16, 37, 64, 100], seed=11)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    # 2 layers x 2 (k, v) x 16 tokens x 2 heads x 16 dims x 4 bytes = 8 KiB per block.
    llm = LLM(str(tiny_models["mistral"]), max_model_len=384, kv_cache_gb=24 * 8192 / 1e9)
    assert llm.engine.model_info.num_blocks == 24
    outputs = llm.generate(prompts, params)
    assert llm.engine.get_stats().num_preemptions > 0
    hf = hf_models("mistral")
    assert _tokens(outputs) == [hf_greedy(hf, p, 40) for p in prompts]
    assert llm.engine.kv.usage() == 0.0  # every block returned once all requests finished


def test_request_needing_the_whole_pool_completes_beside_others(tiny_models):
    kv_gb = 8 * 8192 / 1e9  # 8 blocks = 128 tokens
    llm = LLM(str(tiny_models["llama"]), max_model_len=128, kv_cache_gb=kv_gb)
    big = prompts_of_lengths([100], seed=7)[0]
    small = prompts_of_lengths([20, 30, 40], seed=8)
    params = SamplingParams(temperature=0, max_tokens=28, ignore_eos=True)
    outputs = llm.generate([big, *small], params)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [28] * 4


def test_prefix_cache_hit_gives_identical_tokens_and_moves_the_hit_counter(
    tiny_models, hf_models
):
    llm = LLM(str(tiny_models["qwen2"]), max_model_len=512)
    shared = prompts_of_lengths([80], seed=3)[0]
    first, second = shared + [7, 8, 9], shared + [10, 11]
    out1 = llm.generate([first], GREEDY)
    hits_before = llm.engine.get_stats().prefix_cache_hits
    out2 = llm.generate([second], GREEDY)
    stats = llm.engine.get_stats()
    assert stats.prefix_cache_hits - hits_before == 80  # five full blocks of 16
    assert out2[0].num_cached_tokens == 80
    hf = hf_models("qwen2")
    assert _tokens(out1) == [hf_greedy(hf, first, NEW_TOKENS)]
    assert _tokens(out2) == [hf_greedy(hf, second, NEW_TOKENS)]


def test_different_cache_salts_never_share_blocks(tiny_models):
    from soberana.engine.outputs import EngineCoreRequest

    llm = LLM(str(tiny_models["llama"]), max_model_len=512)
    prompt = prompts_of_lengths([64], seed=4)[0]
    core = llm.engine
    for rid, salt in (("a", "tenant-a"), ("b", "tenant-b"), ("c", "tenant-a")):
        core.add_request(EngineCoreRequest(rid, prompt, SamplingParams(max_tokens=1), 0.0,
                                           cache_salt=salt))
        first_outputs = []
        while core.has_unfinished_requests():
            first_outputs += core.step()
        assert first_outputs[0].num_cached_tokens == {"a": 0, "b": 0, "c": 48}[rid]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_logprobs_equal_transformers_log_softmax(arch, tiny_models, hf_models):
    llm = LLM(str(tiny_models[arch]), max_model_len=512)
    prompts = prompts_of_lengths([9, 40], seed=5)
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=5, prompt_logprobs=3,
                            ignore_eos=True)
    hf = hf_models(arch)
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        sample = out.outputs[0]
        full = torch.tensor([prompt + sample.token_ids])
        with torch.no_grad():
            ref = torch.log_softmax(hf(full).logits[0].float(), dim=-1)
        for step, (tok, lps) in enumerate(zip(sample.token_ids, sample.logprobs)):
            row = ref[len(prompt) - 1 + step]
            assert lps[tok].logprob == pytest.approx(row[tok].item(), abs=1e-4)
            assert lps[tok].rank == 1  # greedy picks the most likely token
            top = row.topk(5)
            for tid, val in zip(top.indices.tolist(), top.values.tolist()):
                assert lps[tid].logprob == pytest.approx(val, abs=1e-4)
        assert out.prompt_logprobs[0] is None
        for pos in range(1, len(prompt)):
            tok = prompt[pos]
            assert out.prompt_logprobs[pos][tok].logprob == pytest.approx(
                ref[pos - 1, tok].item(), abs=1e-4
            )
        assert sample.cumulative_logprob == pytest.approx(
            sum(lps[t].logprob for t, lps in zip(sample.token_ids, sample.logprobs)), abs=1e-5
        )
