"""Structured outputs in the engine (LLM.generate with SamplingParams.structured_outputs)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from soberana.engine.llm import LLM
from soberana.engine.sampling_params import SamplingParams
from soberana.structured.compiler import GrammarError
from soberana.structured.params import StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                   "ok": {"type": "boolean"},
                   "name": {"type": "string", "maxLength": 8}},
    "required": ["id", "ok", "name"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async-scheduling"])
def llm(request, tiny_models):
    return LLM(str(tiny_models["llama31"]), max_model_len=256, kv_cache_gb=0.02,
               async_scheduling=request.param)


def test_json_schema_samples_always_validate(llm):
    params = SamplingParams(n=24, temperature=1.0, seed=5, max_tokens=64,
                            structured_outputs=StructuredOutputsParams(json=SCHEMA))
    [out] = llm.generate(["The record:"], params, use_tqdm=False)
    for sample in out.outputs:
        assert sample.finish_reason == "stop", sample.text
        jsonschema.validate(json.loads(sample.text), SCHEMA)


def test_constrained_and_free_requests_share_a_batch(llm):
    free = SamplingParams(temperature=0.0, max_tokens=12)
    choice = SamplingParams(temperature=1.0, seed=3, max_tokens=12,
                            structured_outputs=StructuredOutputsParams(choice=["red", "green"]))
    alone = llm.generate(["a b c"], free, use_tqdm=False)[0].outputs[0].token_ids
    outs = llm.generate(["a b c", "pick:"], [free, choice], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == alone  # the mask touched only its own row
    assert outs[1].outputs[0].text in ("red", "green")


def test_constraint_starts_after_the_reasoning_end_tokens(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    free = llm.generate(["think:"], greedy, use_tqdm=False)[0].outputs[0].token_ids
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    end = [free[k]]  # a token the model writes on its own at position k, and not before
    spec = StructuredOutputsParams(regex="(yes|no)", reasoning_end_token_ids=end)
    out = llm.generate(["think:"], greedy.clone(max_tokens=20, structured_outputs=spec),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids[: k + 1] == free[: k + 1]  # free until the end token
    answer = llm.tokenizer.decode(out.token_ids[k + 1:], skip_special_tokens=True)
    assert answer in ("yes", "no")


def test_malformed_constraints_raise_naming_them(llm):
    with pytest.raises(GrammarError, match="regex"):
        llm.generate(["x"], SamplingParams(structured_outputs=StructuredOutputsParams(regex="(a")),
                     use_tqdm=False)
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"json": {}})
    assert not llm.engine.requests  # nothing left behind
