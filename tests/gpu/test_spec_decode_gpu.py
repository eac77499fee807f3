"""Speculative decoding on a GPU: verification steps replay their CUDA graphs
(engine/verify_graphs.py) and give the tokens of eager verification and of the plain engine,
with every request drafting (a draft model equal to the target) and with a mix of drafting
and plain decodes in one step (n-gram on repetitive and random prompts). The drafter's own
single-token steps replay its CUDA graphs (draft model and layer-skip)."""

from __future__ import annotations

import pytest
import torch

from soberana import LLM, SamplingParams
from tests.engine.tiny_models import prompts_of_lengths

pytestmark = pytest.mark.gpu

VOCAB = 2048
K = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import transformers

    from soberana.models.loader import resolve_model_path

    out = tmp_path_factory.mktemp("spec-llama")
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
        initializer_range=0.05)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    for f in resolve_model_path("demo").glob("tokenizer*"):
        (out / f.name).write_bytes(f.read_bytes())
    return out


def _tokens(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _three_ways(llm: LLM, prompts, params):
    """(graph-verified, eager-verified, plain) tokens of one engine, and the graph steps."""
    engine = llm.engine
    graphs = engine.runner.verify_graphs
    assert graphs is not None, "verification graphs were not captured"
    before = graphs.num_replays
    with_graphs = _tokens(llm, prompts, params)
    replays = graphs.num_replays - before
    engine.runner.verify_graphs = None
    try:
        eager = _tokens(llm, prompts, params)
    finally:
        engine.runner.verify_graphs = graphs
    spec, engine.spec = engine.spec, None
    try:
        plain = _tokens(llm, prompts, params)
    finally:
        engine.spec = spec
    return with_graphs, eager, plain, replays


def _agree(a, b) -> int:
    return sum(x == y for x, y in zip(a, b))


def test_draft_equal_to_target_verifies_in_graphs(model_dir):
    """Every request drafts K tokens each step and all are accepted: each step is Q = K + 1
    rows per request, from 1 to 12 requests (buckets 1..16 with padding requests)."""
    llm = LLM(str(model_dir), dtype="float32", max_model_len=1024, kv_cache_gb=1,
              enable_prefix_caching=False,
              speculative_config={"method": "draft_model", "model": str(model_dir),
                                  "num_speculative_tokens": K})
    assert llm.engine.runner.verify_graphs.query_len == K + 1
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, detokenize=False)
    for n in (1, 3, 12):
        prompts = prompts_of_lengths([9, 60, 200, 31] * 3, seed=n, vocab=VOCAB)[:n]
        graphs, eager, plain, replays = _three_ways(llm, prompts, params)
        assert replays > 0
        # float32: the graph runs the eager step's kernels on the same rows; batch-shape
        # effects in the GEMMs may at most flip a rare near-tie.
        assert _agree(graphs, eager) >= n - (n > 3), (n, graphs, eager)
        assert _agree(graphs, plain) >= n - (n > 3), (n, graphs, plain)
    assert llm.engine.spec.stats.acceptance_rate > 0.95
    # The drafter (equal to the target) drafted in its own graphs; all its drafts accepted
    # above shows the graph-drafted tokens are the target's own greedy tokens.
    proposer = llm.engine.spec.proposer
    assert proposer.graphs is not None and proposer.num_graph_steps > 0


def test_layer_skip_drafts_in_graphs_and_keeps_the_tokens(model_dir):
    """Self-speculation: the target's first 2 layers draft in their own CUDA graphs; the
    drafts (graphs or eager) and the verified tokens match the plain engine's."""
    llm = LLM(str(model_dir), dtype="float32", max_model_len=1024, kv_cache_gb=1,
              enable_prefix_caching=False,
              speculative_config={"method": "layer_skip", "num_draft_layers": 2,
                                  "num_speculative_tokens": K, "min_acceptance_rate": 0.0})
    proposer = llm.engine.spec.proposer
    assert proposer.graphs is not None
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, detokenize=False)
    prompts = prompts_of_lengths([9, 60, 200, 31, 120], seed=11, vocab=VOCAB)
    before = proposer.num_graph_steps
    graphs, eager, plain, _ = _three_ways(llm, prompts, params)
    assert proposer.num_graph_steps > before
    stats = llm.engine.spec.stats
    accepted, drafted = stats.num_accepted_tokens, stats.num_draft_tokens
    proposer.graphs, saved = None, proposer.graphs  # the same run with eager drafting
    try:
        eager_drafting = _tokens(llm, prompts, params)
    finally:
        proposer.graphs = saved
    assert drafted > 0
    assert _agree(graphs, plain) >= len(prompts) - 1, (graphs, plain)
    assert _agree(eager_drafting, plain) >= len(prompts) - 1
    # Eager and graph drafting propose the same tokens up to rare float32 near-ties: the
    # two runs accept (nearly) the same share of their drafts.
    rate_graphs = accepted / drafted
    rate_eager = ((stats.num_accepted_tokens - accepted)
                  / max(1, stats.num_draft_tokens - drafted))
    assert abs(rate_graphs - rate_eager) < 0.05, (rate_graphs, rate_eager)


def test_mixed_steps_of_drafts_and_plain_decodes_replay_graphs(model_dir):
    """n-gram drafts for prompts that repeat a pattern, none for random ones: steps hold
    requests verifying up to K drafts beside plain decodes (one real row, padded)."""
    llm = LLM(str(model_dir), dtype="float32", max_model_len=1024, kv_cache_gb=1,
              enable_prefix_caching=False,
              speculative_config={"method": "ngram", "num_speculative_tokens": K,
                                  "prompt_lookup_min": 1, "prompt_lookup_max": 3,
                                  "min_acceptance_rate": 0.0})
    g = torch.Generator().manual_seed(5)
    pattern = torch.randint(0, VOCAB, (7,), generator=g).tolist()
    prompts = [pattern * 12, *prompts_of_lengths([40, 90], seed=6, vocab=VOCAB),
               pattern[2:] * 9, prompts_of_lengths([15], seed=7, vocab=VOCAB)[0]]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, detokenize=False)
    graphs, eager, plain, replays = _three_ways(llm, prompts, params)
    assert replays > 0
    assert llm.engine.spec.stats.num_drafts > 0
    assert _agree(graphs, eager) >= len(prompts) - 1
    assert _agree(graphs, plain) >= len(prompts) - 1


def test_verification_graphs_run_the_few_row_gemv(model_dir):
    """A verification step of one request (K + 1 = 5 rows) runs the fused few-row GEMVs
    inside its CUDA graph, and its tokens stay the plain engine's."""
    from soberana.ops.backend import with_kernels
    from soberana.ops.triton.gemv import gemv

    llm = LLM(str(model_dir), dtype="float32", max_model_len=1024, kv_cache_gb=1,
              enable_prefix_caching=False,
              speculative_config={"method": "draft_model", "model": str(model_dir),
                                  "num_speculative_tokens": K})
    engine = llm.engine
    model, graphs = engine.worker.model, engine.runner.verify_graphs
    rows = []

    def counted(x, *a, **kw):
        rows.append(x.shape[0])
        return gemv(x, *a, **kw)

    # capture the verification graphs again through a counting GEMV (its warm-up runs it)
    model.use_kernels(with_kernels(model.kernels, gemv=counted))
    graphs.graphs.clear()
    graphs.capture(engine.worker.graphs.pool)
    assert K + 1 in rows  # bucket 1: one request's K + 1 rows
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, detokenize=False)
    prompts = prompts_of_lengths([9, 60], seed=3, vocab=VOCAB)
    for prompt in prompts:  # one request at a time: bucket 1
        graphed, eager, plain, replays = _three_ways(llm, [prompt], params)
        assert replays > 0
        assert graphed == plain and eager == plain
