"""SmolLM2-135M-Instruct quantized to int8 at load still answers the capital of France."""

import os
from pathlib import Path

import pytest

MODEL = Path(os.environ.get("SOBERANA_SMOLLM2", "/work/models/hf/SmolLM2-135M-Instruct"))


@pytest.mark.slow
@pytest.mark.skipif(not (MODEL / "config.json").is_file(),
                    reason="SmolLM2 weights not fetched (shared/real-models/fetch.sh)")  # fmt: skip
def test_smollm2_int8_answers_paris():
    from soberana import LLM, SamplingParams

    llm = LLM(str(MODEL), kv_cache_gb=0.1, max_model_len=256, max_num_seqs=2,
              max_num_batched_tokens=128, quantization="int8")  # fmt: skip
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=12))
    assert "Paris" in out[0].outputs[0].text
