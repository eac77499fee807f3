"""Async scheduling (step N+1 prepared while step N runs) changes when ids reach the host,
never which ids: outputs equal transformers' and the synchronous engine's in every case.

On CPU the overlap buys nothing, but the bookkeeping (placeholders, ids fed from the previous
step's device tensor, stops seen one step late) is the same code the GPU runs.
"""

from __future__ import annotations

import pytest

from soberana import LLM, SamplingParams
from soberana.engine.outputs import EngineCoreRequest
from soberana.engine.request import PLACEHOLDER
from tests.engine.tiny_models import hf_greedy, prompts_of_lengths

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def _pair(path, **kwargs) -> tuple[LLM, LLM]:
    return (LLM(str(path), async_scheduling=True, **kwargs),
            LLM(str(path), async_scheduling=False, **kwargs))


@pytest.mark.parametrize("budget", [7, 8192])
def test_greedy_tokens_equal_transformers_with_async_scheduling(tiny_models, hf_models, budget):
    prompts = prompts_of_lengths([1, 5, 16, 37, 100], seed=21)
    llm = LLM(str(tiny_models["llama31"]), max_model_len=512, async_scheduling=True,
              max_num_batched_tokens=budget)
    assert llm.engine.async_scheduling
    hf = hf_models("llama31")
    assert _tokens(llm.generate(prompts, GREEDY)) == [hf_greedy(hf, p, 12) for p in prompts]
    assert llm.engine.kv.usage() == 0.0
    assert not llm.engine.has_unfinished_requests()


def test_preemption_under_async_scheduling_gives_identical_tokens(tiny_models, hf_models):
    prompts = prompts_of_lengths([5, 16, 37, 64, 100], seed=11)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    llm = LLM(str(tiny_models["mistral"]), max_model_len=384, kv_cache_gb=24 * 8192 / 1e9,
              async_scheduling=True)
    outputs = llm.generate(prompts, params)
    assert llm.engine.get_stats().num_preemptions > 0
    hf = hf_models("mistral")
    assert _tokens(outputs) == [hf_greedy(hf, p, 40) for p in prompts]
    assert llm.engine.kv.usage() == 0.0


def test_blocks_completed_by_generated_tokens_are_cached_under_their_real_ids(
    tiny_models, hf_models
):
    # 30 prompt + 34 output tokens = 4 full blocks; the last two are completed by tokens that
    # were placeholders when their blocks were allocated. A wrong hash would serve wrong KV.
    llm = LLM(str(tiny_models["qwen2"]), max_model_len=512, async_scheduling=True)
    first = prompts_of_lengths([30], seed=31)[0]
    answer = llm.generate([first], SamplingParams(temperature=0, max_tokens=35,
                                                  ignore_eos=True))[0].outputs[0].token_ids
    assert PLACEHOLDER not in answer
    follow_up = first + answer[:34] + [5, 6, 7]
    out = llm.generate([follow_up], GREEDY)[0]
    assert out.num_cached_tokens == 64
    assert _tokens([out]) == [hf_greedy(hf_models("qwen2"), follow_up, 12)]


def test_sampling_stops_and_logprobs_match_the_synchronous_engine(tiny_models):
    on, off = _pair(tiny_models["qwen3"], max_model_len=256)
    prompts = prompts_of_lengths([3, 20, 50, 90], seed=41)
    frequent = off.generate(prompts, GREEDY)[2].outputs[0].token_ids[3]
    cases = [
        SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=5, seed=3, n=2, max_tokens=15, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[frequent]),
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[frequent], min_tokens=8),
        # Penalties read the previous id: those steps fall back to reading it first.
        SamplingParams(temperature=0, max_tokens=16, repetition_penalty=1.3,
                       frequency_penalty=0.5, presence_penalty=0.4, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=10, logprobs=3, ignore_eos=True),
    ]
    for params in cases:
        a, b = on.generate(prompts, params), off.generate(prompts, params)
        for x, y in zip(a, b):
            assert [c.token_ids for c in x.outputs] == [c.token_ids for c in y.outputs]
            assert [c.finish_reason for c in x.outputs] == [c.finish_reason for c in y.outputs]
            assert [c.text for c in x.outputs] == [c.text for c in y.outputs]
            if params.logprobs:
                for cx, cy in zip(x.outputs, y.outputs):
                    for lx, ly in zip(cx.logprobs, cy.logprobs):
                        assert {t: v.logprob for t, v in lx.items()} == pytest.approx(
                            {t: v.logprob for t, v in ly.items()}, abs=1e-6)
    stopped = on.generate(prompts, cases[2])
    assert any(o.outputs[0].finish_reason == "stop" for o in stopped)  # the case is exercised
    assert on.engine.kv.usage() == 0.0


def test_length_limited_requests_compute_no_extra_tokens(tiny_models):
    # Async scheduling must not run a request one step past max_tokens: it knows on the host.
    prompts = prompts_of_lengths([4, 30, 70], seed=51)
    counts = []
    for llm in _pair(tiny_models["llama"], max_model_len=256):
        schedule = llm.engine.scheduler.schedule
        scheduled = []

        def counting(schedule=schedule, scheduled=scheduled):
            out = schedule()
            scheduled.append(out.num_tokens)
            return out

        llm.engine.scheduler.schedule = counting
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))
        counts.append(sum(scheduled))
    assert counts[0] == counts[1] == sum(len(p) for p in prompts) + 3 * 8


def test_abort_while_a_step_is_in_flight_frees_everything(tiny_models):
    llm = LLM(str(tiny_models["llama"]), max_model_len=256, async_scheduling=True)
    core = llm.engine
    prompts = prompts_of_lengths([10, 40], seed=61)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    core.add_request(EngineCoreRequest("keep", prompts[0], params, 0.0))
    core.add_request(EngineCoreRequest("drop", prompts[1], params, 0.0))
    got: dict[str, list[int]] = {"keep": [], "drop": []}
    for _ in range(5):
        for out in core.step():
            got[out.request_id] += out.new_token_ids
    assert core._pending is not None  # a step is in flight
    core.abort_requests(["drop"])
    while core.has_unfinished_requests():
        for out in core.step():
            assert out.request_id == "keep"
            got["keep"] += out.new_token_ids
    assert core.kv.usage() == 0.0
    alone = LLM(str(tiny_models["llama"]), max_model_len=256, async_scheduling=False)
    assert got["keep"] == alone.generate([prompts[0]], params)[0].outputs[0].token_ids
    assert PLACEHOLDER not in got["drop"]
