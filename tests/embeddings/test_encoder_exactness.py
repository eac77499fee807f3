"""Soberana's encoders give what transformers and sentence-transformers give on the same
weights: embeddings (BERT, XLM-R; mean/CLS pooling) and cross-encoder scores."""

from __future__ import annotations

import pytest
import torch
from sentence_transformers import CrossEncoder, SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

from soberana import LLM
from soberana.ops.cpu import kernels as cpu_kernels

SENTENCES = [
    "Hello world",
    "a",
    "The engine packs sequences of different lengths into one batch without padding.",
    "¿Dónde está la biblioteca municipal de Sevilla?",
    "short one",
    "Sovereign inference keeps prompts on hardware the organisation controls. " * 4,
]
DOCUMENTS = ["Paris is the capital of France.", "Bananas are yellow.", "France", "x " * 40]


def _sentence_transformer(path, pooling: str) -> SentenceTransformer:
    word = Transformer(str(path))
    pool = Pooling(word.get_embedding_dimension(), pooling_mode=pooling)
    return SentenceTransformer(modules=[word, pool], device="cpu")


@pytest.mark.parametrize("kind", ["bert", "xlmr"])
def test_embeddings_equal_sentence_transformers_cls_pooling(tiny_encoder, kind):
    path = tiny_encoder(kind)
    llm = LLM(str(path), task="embed")
    ours = torch.tensor(llm.embed(SENTENCES))
    # No modules.json: an encoder directory defaults to CLS pooling (as vLLM's BERT does);
    # compare with sentence-transformers set the same way.
    ref = torch.tensor(_sentence_transformer(path, "cls").encode(SENTENCES))
    assert ours.shape == ref.shape
    cos = torch.nn.functional.cosine_similarity(ours, ref)
    assert cos.min() > 0.99999, cos
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["bert-cross", "xlmr-cross"])
def test_cross_encoder_scores_equal_sentence_transformers(tiny_encoder, kind):
    path = tiny_encoder(kind)
    llm = LLM(str(path))  # task auto: a classification head means rerank
    assert llm.engine.model_info.task == "rerank"
    query = "What is the capital of France?"
    ours = llm.score(query, DOCUMENTS)
    ref = CrossEncoder(str(path), device="cpu").predict([(query, d) for d in DOCUMENTS])
    # sentence-transformers applies a sigmoid to a one-label cross-encoder, as we do.
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref, dtype=torch.float32),
                               atol=1e-5, rtol=1e-5)


def _cpu_isas() -> list[str]:
    """This CPU's build, and on an AVX-512 CPU the AVX2 + FMA one (CPUs without AVX-512)."""
    return ["native", "avx2"] if "avx512f" in cpu_kernels.cpu_flags() else ["native"]


@pytest.mark.parametrize("cpu_isa", _cpu_isas())
def test_real_minilm_embeddings_equal_sentence_transformers(minilm, cpu_isa):
    try:
        llm = LLM(str(minilm), cpu_isa=cpu_isa)
        assert llm.engine.model_info.task == "embed"
        ours = torch.tensor(llm.embed(SENTENCES))
        served = llm.engine.model_info.compute["kernels"]["attention/LayerNorm"]
    finally:
        cpu_kernels.set_isa("native")  # process-wide: the other tests build for this CPU
    # the vectorised kernels, AVX2 builds too
    avx512 = cpu_isa == "native" and "avx512f" in cpu_kernels.cpu_flags()
    assert served == ("native AVX-512" if avx512 else "native AVX2+FMA"), served
    ref = torch.tensor(SentenceTransformer(str(minilm), device="cpu").encode(SENTENCES))
    cos = torch.nn.functional.cosine_similarity(ours, ref)
    assert cos.min() > 0.99999, cos


def test_embedder_scores_by_cosine_and_ranks_the_answer_first(minilm):
    llm = LLM(str(minilm))
    scores = llm.score("What is the capital of France?", DOCUMENTS)
    assert max(range(len(scores)), key=scores.__getitem__) == 0
    assert all(-1.0 <= s <= 1.0 + 1e-6 for s in scores)


def test_generation_methods_refuse_an_embedding_model_and_vice_versa(minilm):
    llm = LLM(str(minilm))
    with pytest.raises(ValueError, match="task generate"):
        llm.generate("hello")
    with pytest.raises(ValueError, match="task"):
        LLM(str(minilm), task="generate")


def test_overlong_input_is_refused_unless_truncation_is_asked(minilm):
    llm = LLM(str(minilm))
    long_text = "word " * 400  # > 256 tokens (the model's sentence-transformers limit)
    with pytest.raises(ValueError, match="limit is 256"):
        llm.embed(long_text)
    [vector] = llm.embed(long_text, truncate_prompt_tokens=-1)
    assert len(vector) == 384
