"""An encoder served with `--quantization int8`: its linears run soberana's int8 CPU kernel
(W8A8) and its embeddings stay close to sentence-transformers' float32 ones; schemes with no
encoder path are refused at start, not ignored."""

from __future__ import annotations

import pytest
import torch
from sentence_transformers import SentenceTransformer

from soberana import LLM
from soberana.ops.cpu import kernels as cpu_kernels
from tests.embeddings.test_encoder_exactness import SENTENCES, _cpu_isas

# Measured on all-MiniLM-L6-v2 (Intel Xeon, AVX512_VNNI): min cosine 0.9983 over SENTENCES,
# 0.9987 over 256 sentences of 8-256 tokens; int8 weights alone (W8A16) 0.9991.
MIN_COSINE_INT8 = 0.997


@pytest.mark.parametrize("cpu_isa", _cpu_isas())
def test_int8_minilm_runs_the_w8a8_kernel_close_to_sentence_transformers(minilm, cpu_isa):
    try:
        llm = LLM(str(minilm), quantization="int8", cpu_isa=cpu_isa)
        ours = torch.tensor(llm.embed(SENTENCES))
        linears = llm.engine.model_info.compute["kernels"]["linears"]
    finally:
        cpu_kernels.set_isa("native")  # process-wide: the other tests build for this CPU
    assert linears.startswith("int8: soberana int8 CPU kernel W8A8"), linears
    ref = torch.tensor(SentenceTransformer(str(minilm), device="cpu").encode(SENTENCES))
    cos = torch.nn.functional.cosine_similarity(ours, ref)
    assert cos.min() > MIN_COSINE_INT8, cos
    assert cos.min() < 0.99999, cos  # the weights were quantized, not served in float32


@pytest.mark.parametrize("scheme", ["int4", "fp8"])
def test_encoder_refuses_a_scheme_it_has_no_path_for(minilm, scheme):
    with pytest.raises(ValueError, match="int8 or int8_w8a16"):
        LLM(str(minilm), quantization=scheme)
