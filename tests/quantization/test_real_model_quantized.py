"""SmolLM2-135M-Instruct (the default model: its GGUF from the package index, or the Hugging
Face cache) quantized to int8 at load still answers the capital of France."""

import pytest

from soberana.models import default_model


@pytest.mark.slow
def test_smollm2_int8_answers_paris():
    from soberana import LLM, SamplingParams

    path = default_model.default_model_path()
    if path is None:
        pytest.skip("SmolLM2-135M-Instruct is neither cached nor fetchable from the package index")
    llm = LLM(str(path), kv_cache_gb=0.1, max_model_len=256, max_num_seqs=2,
              max_num_batched_tokens=128, quantization="int8")  # fmt: skip
    assert llm.engine.model_info.quantization is not None
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=12))
    assert "Paris" in out[0].outputs[0].text
