"""Async scheduling while speculating: steps that verify drafts are read back at once, steps
without drafts (a batch over `disable_by_batch_size`, paused or prefilling requests) keep
overlapping with the next; output is the synchronous plain engine's, token for token."""

from __future__ import annotations

import pytest

from soberana import LLM, SamplingParams
from tests.engine.tiny_models import prompts_of_lengths


def _prompts() -> list[list[int]]:
    a, b, c, d = prompts_of_lengths([7, 12, 30, 50], seed=3)
    return [a * 3, b + b[:5], c, d + a + d[:9], a[:2]]


def _params() -> list[SamplingParams]:
    # Different lengths: the batch shrinks below disable_by_batch_size as requests finish,
    # so the run moves from overlapped plain steps to verification steps.
    return [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True,
                           stop_token_ids=[] if i else [17], presence_penalty=0.3 * (i == 2))
            for i, n in enumerate([6, 10, 14, 18, 24])]


@pytest.fixture(scope="module")
def plain_answers(tiny_models):
    llm = LLM(str(tiny_models["mistral"]), max_model_len=256, async_scheduling=False)
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason)
            for o in llm.generate(_prompts(), _params())]


@pytest.mark.parametrize("method", ["ngram", "draft_model", "layer_skip"])
def test_async_scheduling_with_speculation_gives_the_plain_engines_tokens(
        method, tiny_models, plain_answers):
    spec = {"method": method, "num_speculative_tokens": 3, "disable_by_batch_size": 3,
            "min_acceptance_rate": 0.0}
    if method == "draft_model":
        spec["model"] = str(tiny_models["mistral"])
    if method == "layer_skip":
        spec["num_draft_layers"] = 1
    llm = LLM(str(tiny_models["mistral"]), max_model_len=256, async_scheduling=True,
              max_num_batched_tokens=48, speculative_config=spec)
    engine = llm.engine
    assert engine.async_scheduling  # no longer turned off by a speculative_config
    overlapped = []
    step = engine.step

    def counting_step():
        out = step()
        overlapped.append(engine._pending is not None)  # a step left in flight
        return out

    engine.step = counting_step
    got = [(o.outputs[0].token_ids, o.outputs[0].finish_reason)
           for o in llm.generate(_prompts(), _params())]
    assert got == plain_answers
    assert any(overlapped), "no step overlapped the next"
    assert engine.get_stats().spec_decoding.num_drafts > 0
    assert engine.kv.usage() == 0.0 and not engine.has_unfinished_requests()
