"""Speculation for requests whose logits depend on the output so far: repetition, frequency
and presence penalties, min_tokens and structured-output grammars. Each verified position is
penalised and masked as the plain engine would have done after the drafts before it, so
greedy output is identical to the plain engine's and grammar output always validates.

An oracle proposer (drafts = the plain engine's own answer, every third one corrupted) makes
every verification row count: accepted drafts test the rows past the first, corrupted ones
the rejection path. The real proposers are checked for identity too."""

from __future__ import annotations

import json

import jsonschema
import pytest

from soberana import LLM, SamplingParams
from soberana.engine.spec_decode.proposer import Proposer
from soberana.structured.params import StructuredOutputsParams
from tests.engine.tiny_models import prompts_of_lengths

SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                   "ok": {"type": "boolean"},
                   "tags": {"type": "array", "items": {"type": "string", "maxLength": 6},
                            "maxItems": 3},
                   "name": {"type": "string", "maxLength": 12}},
    "required": ["id", "ok", "tags", "name"],
    "additionalProperties": False,
}
PENALISED = [
    SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, repetition_penalty=1.4),
    SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, frequency_penalty=0.9,
                   presence_penalty=0.5),
    SamplingParams(temperature=0, max_tokens=20, presence_penalty=-0.7, min_tokens=12),
]


class OracleProposer(Proposer):
    """Drafts the continuation the plain engine produced (keyed by prompt), with every
    `corrupt_every`-th draft replaced by another token."""

    def __init__(self, answers: dict[tuple[int, ...], list[int]], vocab: int,
                 corrupt_every: int = 3) -> None:
        self.answers, self.vocab, self.corrupt_every = answers, vocab, corrupt_every
        self.calls = 0

    def propose(self, requests, num_drafts):
        out = []
        for r, k in zip(requests, num_drafts):
            ref = self.answers[tuple(r.prompt_token_ids)]
            drafts = list(ref[len(r.output_token_ids):len(r.output_token_ids) + k])
            self.calls += 1
            if self.calls % self.corrupt_every == 0 and drafts:
                drafts[-1] = (drafts[-1] + 1) % self.vocab
            out.append(drafts)
        return out


def _prompts() -> list[list[int]]:
    a, b, c = prompts_of_lengths([9, 14, 23], seed=8)
    return [a * 3, b + b[:6], c]


def _outputs(outs) -> list[tuple]:
    return [(c.token_ids, c.finish_reason) for o in outs for c in o.outputs]


def _oracle_llm(path, plain_outs, prompts, **kwargs) -> LLM:
    llm = LLM(str(path), max_model_len=256, speculative_config={
        "method": "ngram", "num_speculative_tokens": 4, "min_acceptance_rate": 0.0}, **kwargs)
    answers = {tuple(p): o.outputs[0].token_ids for p, o in zip(prompts, plain_outs)}
    llm.engine.spec.proposer = OracleProposer(answers, llm.engine.model_info.vocab_size)
    return llm


@pytest.fixture(scope="module")
def penalised_answers(tiny_models):
    """The plain engine's answers to the penalised requests."""
    return LLM(str(tiny_models["mistral"]), max_model_len=256).generate(_prompts(), PENALISED)


def test_penalties_and_min_tokens_verified_per_position_match_the_plain_engine(
        tiny_models, penalised_answers):
    prompts, want = _prompts(), penalised_answers
    llm = _oracle_llm(tiny_models["mistral"], want, prompts)
    assert _outputs(llm.generate(prompts, PENALISED)) == _outputs(want)
    s = llm.engine.get_stats().spec_decoding
    # Most drafts are the plain answer itself: a position penalised without the drafts
    # before it would pick another token and break identity above.
    assert s.num_draft_tokens > 40 and s.acceptance_rate > 0.5, s


@pytest.mark.parametrize("method", ["ngram", "draft_model", "layer_skip"])
def test_every_method_drafts_for_penalised_requests_with_identical_output(
        method, tiny_models, penalised_answers):
    prompts = _prompts()
    spec = {"method": method, "num_speculative_tokens": 3, "min_acceptance_rate": 0.0}
    if method == "draft_model":
        spec["model"] = str(tiny_models["mistral"])
    if method == "layer_skip":
        spec["num_draft_layers"] = 1
    llm = LLM(str(tiny_models["mistral"]), max_model_len=256, speculative_config=spec)
    assert _outputs(llm.generate(prompts, PENALISED)) == _outputs(penalised_answers)
    s = llm.engine.get_stats().spec_decoding
    assert s.num_drafts > 0 and s.num_draft_tokens > 0


@pytest.fixture(scope="module")
def json_llms(tiny_models):
    path = str(tiny_models["llama31"])
    return LLM(path, max_model_len=256), path


def test_json_schema_greedy_with_drafts_equals_the_plain_engine(json_llms):
    plain, path = json_llms
    prompts = [[5, 6, 7, 8], [40, 41, 42, 40, 41, 42], [300, 301]]
    params = SamplingParams(temperature=0, max_tokens=80,
                            structured_outputs=StructuredOutputsParams(json=SCHEMA))
    want = plain.generate(prompts, params, use_tqdm=False)
    llm = _oracle_llm(path, want, prompts)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert _outputs(got) == _outputs(want)
    for o in got:
        jsonschema.validate(json.loads(o.outputs[0].text), SCHEMA)
    s = llm.engine.get_stats().spec_decoding
    # Accepted drafts move the grammar on inside one step: every later row needs the mask
    # after them, or its token (the bonus token included) would not be the plain engine's.
    assert s.num_accepted_tokens > 20 and s.acceptance_rate > 0.5, s


def test_drafts_the_grammar_refuses_are_not_verified(json_llms):
    _, path = json_llms
    llm = LLM(path, max_model_len=256, speculative_config={"method": "ngram"})
    params = SamplingParams(temperature=0, max_tokens=30,
                            structured_outputs=StructuredOutputsParams(json=SCHEMA))
    llm.engine.add_request(_core_request("g", [5, 6, 7], params))
    req = llm.engine.requests["g"][0]
    llm.engine.structured.check(req)
    brace = llm.tokenizer.encode("{", add_special_tokens=False)
    letter = llm.tokenizer.encode("x", add_special_tokens=False)
    # The JSON value must open with "{" (possibly after whitespace); a letter never fits.
    assert llm.engine.structured.valid_drafts(req, letter + brace) == []
    assert llm.engine.structured.valid_drafts(req, brace + letter) == brace
    llm.engine.abort_requests(["g"])


def _core_request(rid, prompt, params):
    import time

    from soberana.engine.outputs import EngineCoreRequest

    return EngineCoreRequest(request_id=rid, prompt_token_ids=prompt, sampling_params=params,
                             arrival_time=time.time())


def test_sampled_json_with_a_drafting_target_always_validates(tiny_models):
    spec = {"method": "draft_model", "model": str(tiny_models["llama31"]),
            "num_speculative_tokens": 3, "min_acceptance_rate": 0.0}
    llm = LLM(str(tiny_models["llama31"]), max_model_len=256, speculative_config=spec)
    params = SamplingParams(n=4, temperature=0.7, top_k=3, seed=11, max_tokens=60,
                            structured_outputs=StructuredOutputsParams(json=SCHEMA))
    [out] = llm.generate([[9, 10, 11]], params, use_tqdm=False)
    for sample in out.outputs:
        assert sample.finish_reason == "stop", sample.text
        jsonschema.validate(json.loads(sample.text), SCHEMA)
    assert llm.engine.get_stats().spec_decoding.num_accepted_tokens > 0
