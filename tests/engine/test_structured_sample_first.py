"""Structured outputs on the CPU sample first and mask only the rows whose token the grammar
refuses (LazyTokenMask). The tokens, logprobs and finish reasons must be exactly those of
masking every row first, for greedy, seeded and unseeded sampling, on the demo model, with
json_schema, regex, choice and Lark constraints; and both of the lazy path's branches (a sampled
token kept, a row masked and chosen again) must actually run."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from soberana.engine.llm import LLM
from soberana.engine.sampler import Sampler
from soberana.engine.sampling_params import SamplingParams
from soberana.structured.manager import LazyTokenMask
from soberana.structured.params import StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                   "ok": {"type": "boolean"},
                   "note": {"type": "string", "maxLength": 24},
                   "tags": {"type": "array", "items": {"enum": ["a", "bc", "def"]},
                            "maxItems": 3}},
    "required": ["id", "ok", "note", "tags"],
    "additionalProperties": False,
}
CONSTRAINTS = {
    "json_schema": StructuredOutputsParams(json=SCHEMA),
    "regex": StructuredOutputsParams(regex=r"[a-z]{2,6}(-[0-9]{1,3})? (yes|no)"),
    "choice": StructuredOutputsParams(choice=["red", "green", "blue", "dark red"]),
    # Lark without byte forcing: llguidance's mask then takes forced bytes as a prefix
    "grammar": StructuredOutputsParams(
        grammar='%llguidance { "no_forcing": true }\n'
                'start: "say " WORD (", " WORD)* "."\nWORD: /[a-z]{1,8}/'),
}
PROMPTS = ["The record:", "Answer:", "pick one", "a b c d"]


@pytest.fixture(scope="module")
def llm():
    return LLM("demo", max_model_len=256, kv_cache_gb=0.02, max_num_seqs=16)


class Refusals:
    """Counts of the lazy path's two branches over a run: sampled tokens the grammar kept,
    and rows it sent to the mask."""

    def __init__(self, monkeypatch) -> None:
        self.kept = self.masked = 0
        refused = LazyTokenMask.refused

        def counted(mask: LazyTokenMask, tokens: list[int]) -> list[int]:
            rows = refused(mask, tokens)
            self.masked += len(rows)
            self.kept += len(mask.matchers) - len(rows)
            return rows

        monkeypatch.setattr(LazyTokenMask, "refused", counted)


def _run(llm: LLM, params: list[SamplingParams], sample_first: bool, monkeypatch
         ) -> list[tuple]:
    """Every sample's tokens, logprobs and finish reason, with the global RNG reset first
    (unseeded rows draw from it)."""
    with monkeypatch.context() as m:
        if not sample_first:  # the mask-first path: every constrained row masked at once
            m.setattr(Sampler, "_samples_first", lambda self, token_mask, requests: False)
        torch.manual_seed(1234)
        outs = llm.generate([PROMPTS[i % len(PROMPTS)] for i in range(len(params))], params,
                            use_tqdm=False)
    return [(list(o.token_ids), o.finish_reason, o.logprobs)
            for out in outs for o in out.outputs]


@pytest.mark.parametrize("kind", list(CONSTRAINTS))
def test_sampling_first_gives_the_tokens_of_masking_first(llm, monkeypatch, kind):
    spec = CONSTRAINTS[kind]
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=48, structured_outputs=spec)
              for seed in range(12)]
    params += [SamplingParams(temperature=0.0, max_tokens=48, structured_outputs=spec),
               SamplingParams(temperature=0.7, max_tokens=48, structured_outputs=spec),  # unseeded
               SamplingParams(temperature=1.3, seed=99, n=2, max_tokens=48, logprobs=3,
                              structured_outputs=spec),
               SamplingParams(temperature=0.0, max_tokens=20)]  # unconstrained beside them
    masked_first = _run(llm, params, False, monkeypatch)
    refusals = Refusals(monkeypatch)
    sampled_first = _run(llm, params, True, monkeypatch)
    assert sampled_first == masked_first
    assert refusals.masked > 0
    # both branches ran (a choice forces its bytes after the first token: masked each time)
    assert refusals.kept > 0 or kind == "choice"
    if kind == "json_schema":
        for tokens, finish, _ in sampled_first[:-1]:
            if finish == "stop":
                text = llm.tokenizer.decode(tokens, skip_special_tokens=True)
                jsonschema.validate(json.loads(text), SCHEMA)


def test_greedy_batch_with_penalties_and_min_tokens_matches_masking_first(llm, monkeypatch):
    spec = CONSTRAINTS["json_schema"]
    params = [SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=spec),
              SamplingParams(temperature=0.0, max_tokens=40, repetition_penalty=1.3,
                             structured_outputs=spec),
              SamplingParams(temperature=0.0, max_tokens=40, min_tokens=30,
                             presence_penalty=0.5, structured_outputs=CONSTRAINTS["regex"]),
              SamplingParams(temperature=0.0, max_tokens=12, structured_outputs=CONSTRAINTS["choice"])]
    masked_first = _run(llm, params, False, monkeypatch)
    refusals = Refusals(monkeypatch)
    assert _run(llm, params, True, monkeypatch) == masked_first
    assert refusals.kept > 0 and refusals.masked > 0


def test_batches_with_top_p_mask_first(llm, monkeypatch):
    """Truncation's kept set depends on the mask: such a batch never samples first."""
    refusals = Refusals(monkeypatch)
    params = [SamplingParams(temperature=1.0, seed=3, max_tokens=16,
                             structured_outputs=CONSTRAINTS["json_schema"]),
              SamplingParams(temperature=1.0, seed=4, top_p=0.9, max_tokens=16)]
    llm.generate(PROMPTS[:2], params, use_tqdm=False)
    assert refusals.kept == refusals.masked == 0
