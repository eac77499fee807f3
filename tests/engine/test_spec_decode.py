"""Speculative decoding is lossless: greedy tokens equal the plain engine's and transformers'
for every method under chunked prefill, preemption, prefix hits, n > 1, stop strings and
logprobs; sampled tokens keep the target's distribution (chi-square); bookkeeping bounds."""

from __future__ import annotations

import pytest

from soberana import LLM, SamplingParams
from soberana.engine.config import EngineConfig
from soberana.engine.spec_decode.config import SpeculativeConfig
from soberana.engine.spec_decode.ngram import NgramProposer
from tests.engine.tiny_models import hf_greedy, prompts_of_lengths

NEW = 16


def _prompts() -> list[list[int]]:
    # Repeated segments give prompt lookup something to find; random ones do not.
    a, b, c, d = prompts_of_lengths([7, 12, 30, 50], seed=3)
    return [a * 3, b + b[:5], c, d + a + d[:9], a[:2]]


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def _spec(method: str, tiny_models, k: int = 3, **extra) -> dict:
    cfg = {"method": method, "num_speculative_tokens": k, **extra}
    if method == "draft_model" and "model" not in cfg:
        cfg["model"] = str(tiny_models["mistral"])  # the target itself
    if method == "layer_skip":
        cfg.setdefault("num_draft_layers", 1)
    return cfg


@pytest.fixture(scope="module")
def references(hf_models):
    hf = hf_models("mistral")
    return [hf_greedy(hf, p, NEW) for p in _prompts()]


@pytest.mark.parametrize("method", ["ngram", "draft_model", "layer_skip"])
def test_greedy_equals_transformers_with_preemption_chunking_and_prefix_hits(
        method, tiny_models, references):
    prompts, refs = _prompts(), references
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    # 8 blocks of 16 tokens: the answers outgrow it (preemption); a 32-token budget
    # chunks the longer prompts and trims drafts to what fits.
    llm = LLM(str(tiny_models["mistral"]), max_model_len=128, kv_cache_gb=8 * 8192 / 1e9,
              max_num_batched_tokens=32, speculative_config=_spec(method, tiny_models))
    assert _tokens(llm.generate(prompts, params)) == refs
    stats = llm.engine.get_stats()
    assert stats.num_preemptions > 0
    assert stats.spec_decoding.num_draft_tokens > 0
    assert llm.engine.kv.usage() == 0.0
    # The same prompt twice in one batch: the second finds the first's blocks cached.
    again = llm.generate([prompts[0], prompts[0]], params)
    assert _tokens(again) == [refs[0], refs[0]]
    assert again[1].num_cached_tokens > 0


def test_draft_equal_to_target_accepts_every_token(tiny_models):
    prompts = prompts_of_lengths([9, 40], seed=5)
    params = SamplingParams(temperature=0, max_tokens=21, ignore_eos=True)
    llm = LLM(str(tiny_models["mistral"]), max_model_len=256,
              speculative_config=_spec("draft_model", tiny_models, k=4))
    out = llm.generate(prompts, params)
    s = llm.engine.get_stats().spec_decoding
    # 21 tokens: the first from the prefill, then 4 steps of 4 drafts + 1 bonus.
    assert s.num_drafts == 2 * 4 and s.num_draft_tokens == 2 * 16
    assert s.num_accepted_tokens == s.num_draft_tokens
    assert s.num_accepted_tokens_per_pos == [s.num_drafts] * 4
    assert [len(t) for t in _tokens(out)] == [21, 21]


def test_a_random_draft_accepts_few_and_output_is_identical(tiny_models):
    prompts = _prompts()
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    plain = LLM(str(tiny_models["mistral"]), max_model_len=256)
    ref = _tokens(plain.generate(prompts, params))
    spec = _spec("draft_model", tiny_models, k=4, model=str(tiny_models["qwen2"]),
                 min_acceptance_rate=0.0)
    llm = LLM(str(tiny_models["mistral"]), max_model_len=256, speculative_config=spec)
    assert _tokens(llm.generate(prompts, params)) == ref
    s = llm.engine.get_stats().spec_decoding
    assert s.num_draft_tokens > 50 and s.acceptance_rate < 0.2


def test_mixed_batch_n_stop_strings_logprobs_and_penalties_match_the_plain_engine(tiny_models):
    prompts = _prompts()[:3]
    plain = LLM(str(tiny_models["mistral"]), max_model_len=256)
    base = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    first = plain.generate(prompts, base)
    stop_text = first[0].outputs[0].text[6:10]  # a stop string the first answer reaches
    params = [
        SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True, stop=[stop_text]),
        SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True, logprobs=2, n=2),
        SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True,
                       repetition_penalty=1.3),  # decodes without drafts beside the others
    ]
    want = plain.generate(prompts, params)
    llm = LLM(str(tiny_models["mistral"]), max_model_len=256,
              speculative_config=_spec("ngram", tiny_models, k=4))
    got = llm.generate(prompts, params)
    assert llm.engine.get_stats().spec_decoding.num_drafts > 0
    for g, w in zip(got, want):
        assert len(g.outputs) == len(w.outputs)
        for go, wo in zip(g.outputs, w.outputs):
            assert (go.token_ids, go.text, go.finish_reason, go.stop_reason) == (
                wo.token_ids, wo.text, wo.finish_reason, wo.stop_reason)
            if wo.logprobs is not None:
                assert len(go.logprobs) == len(wo.logprobs)
                for a, b in zip(go.logprobs, wo.logprobs):
                    assert a.keys() == b.keys()
                    for t in a:
                        assert a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4)
    assert got[0].outputs[0].finish_reason == "stop"


def test_sampling_keeps_the_target_distribution(tiny_models):
    """Two-sample chi-square of the 2nd and 3rd sampled tokens, speculative (draft = target,
    so many drafts are accepted and many corrected) against the plain engine. Seeds are
    fixed, so the test is deterministic; it fails if p < 0.001 (a wrong correction, such as
    sampling the correction from p instead of p - q, shifts mass to the draft token and
    gives p = 4.5e-7 here)."""
    from scipy.stats import chi2_contingency

    prompt = prompts_of_lengths([6], seed=9)[0]
    # 3 requests of n = 100 (n's limit is 128); sample i of a request has seed + i.
    params = [SamplingParams(temperature=1.0, top_k=4, max_tokens=4, ignore_eos=True, n=100,
                             seed=1000 * j) for j in range(3)]
    plain = LLM(str(tiny_models["mistral"]), max_model_len=64)
    spec = _spec("draft_model", tiny_models, k=2, disable_by_batch_size=512)
    llm = LLM(str(tiny_models["mistral"]), max_model_len=64, speculative_config=spec)
    a = _tokens_all(plain.generate([prompt] * 3, params))
    b = _tokens_all(llm.generate([prompt] * 3, params))
    s = llm.engine.get_stats().spec_decoding
    # Every sample drafted (2 tokens, or 1 where max_tokens leaves room for no more plus the
    # bonus token), and both branches ran.
    assert s.num_drafts >= 300 and 0.2 < s.acceptance_rate < 0.8, s
    for pos in (1, 2, 3):
        cats = sorted({t[pos] for t in a + b})
        table = [[sum(t[pos] == c for t in x) for c in cats] for x in (a, b)]
        keep = [i for i in range(len(cats)) if table[0][i] + table[1][i] >= 5]
        pruned = [[row[i] for i in keep] for row in table]
        assert chi2_contingency(pruned).pvalue > 1e-3, (pos, table)
    # Per-request seeds: the speculative engine reproduces itself (one request again).
    assert _tokens_all(llm.generate([prompt], params[1])) == b[100:200]


def _tokens_all(outputs) -> list[list[int]]:
    return [c.token_ids for o in outputs for c in o.outputs]


def test_large_batches_do_not_speculate(tiny_models):
    prompts = [p * 2 for p in prompts_of_lengths([8] * 3, seed=4)]
    llm = LLM(str(tiny_models["mistral"]), max_model_len=128,
              speculative_config=_spec("ngram", tiny_models, disable_by_batch_size=2))
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert llm.engine.get_stats().spec_decoding.num_drafts == 0


def test_ngram_proposer_continues_the_latest_match():
    p = NgramProposer(k=3, n_min=1, n_max=3)
    assert p._lookup([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 3) == [7, 8, 1]
    assert p._lookup([1, 2, 3, 4], 3) == []
    assert p._lookup([5, 6, 5], 2) == [6, 5]


@pytest.mark.parametrize("value, words", [
    ({"method": "medusa"}, "method"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "draft_model"}, "model"),
    ({"method": "ngram", "k": 3}, "unknown key"),
    ("{not json", "JSON"),
])
def test_bad_speculative_config_is_refused_naming_the_field(value, words):
    with pytest.raises(ValueError, match=words):
        EngineConfig(speculative_config=value).validate()


def test_json_string_config_as_the_cli_passes_it():
    cfg = EngineConfig(speculative_config='{"method": "ngram", "prompt_lookup_max": 5}')
    cfg.validate()
    assert cfg.speculative_config == SpeculativeConfig(method="ngram", prompt_lookup_max=5)


def test_metrics_use_vllms_names():
    from prometheus_client import generate_latest

    from soberana.engine.outputs import SchedulerStats
    from soberana.engine.spec_decode.manager import SpecDecodingStats
    from soberana.server.metrics import ServerMetrics

    m = ServerMetrics("m", 128)
    m.record_scheduler_stats(SchedulerStats(spec_decoding=SpecDecodingStats(3, 9, 5, [3, 2, 0])))
    text = generate_latest(m.registry).decode()
    for line in ('vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 3.0',
                 'vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 9.0',
                 'vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 5.0',
                 'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",'
                 'position="1"} 2.0'):
        assert line in text
