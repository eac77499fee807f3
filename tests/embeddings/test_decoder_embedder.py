"""Decoder embedders (Qwen3-Embedding style): a tiny random Qwen3 built with transformers,
pooled at its last token and normalised, equals transformers' last non-pad hidden state with
left and right padding; detected without `--task`; served by `/v1/embeddings`."""

from __future__ import annotations

import openai
import pytest
import torch
import torch.nn.functional as F

from soberana import LLM
from soberana.engine.pooling_core import resolve_task
from tests.embeddings import tiny_encoders
from tests.engine.tiny_models import build_tiny_model
from tests.server.helpers import API_KEY, ServerProcess

TEXTS = ["a", "sovereign inference on hardware the organisation controls",
         "café naïve 2026", "GPU CPU embeddings " * 12, "hola"]


@pytest.fixture(scope="module")
def qwen3_embedders(tmp_path_factory):
    return tiny_encoders.build_decoder_embedders(tmp_path_factory)


def _reference(path, texts: list[str], side: str) -> torch.Tensor:
    return tiny_encoders.last_token_reference(path, texts, side)


@pytest.mark.parametrize("side", ["left", "right"])
def test_last_token_embeddings_equal_transformers_with_padding(qwen3_embedders, side):
    path = qwen3_embedders["st"]
    llm = LLM(str(path), device="cpu")
    assert llm.engine.model_info.task == "embed"  # detected: modules.json, last token
    ours = torch.tensor(llm.embed(TEXTS))
    ref = _reference(qwen3_embedders["headless"], TEXTS, side)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    cos = F.cosine_similarity(ours, ref, dim=-1)
    assert cos.min() > 0.99999, cos
    assert torch.allclose(ours, ref, atol=2e-5)


def test_headless_decoder_embeds_and_refuses_to_generate(qwen3_embedders):
    path = qwen3_embedders["headless"]
    assert resolve_task("auto", path) == "embed"
    with pytest.raises(ValueError, match="LM head"):
        resolve_task("generate", path)
    with pytest.raises(ValueError, match="rerank"):
        resolve_task("rerank", path)
    # No modules.json: the raw last-token state, not normalised.
    llm = LLM(str(path), device="cpu")
    ours = torch.tensor(llm.embed(TEXTS[:3]))
    ref = _reference(path, TEXTS[:3], "right")
    assert F.cosine_similarity(ours, ref, dim=-1).min() > 0.99999
    assert not torch.allclose(ours.norm(dim=-1), torch.ones(3), atol=1e-3)


def test_a_causal_lm_embeds_with_task_embed(qwen3_embedders):
    """`--task embed` on a generation checkpoint: its last token's final-norm state."""
    path = qwen3_embedders["lm"]
    assert resolve_task("auto", path) == "generate"
    llm = LLM(str(path), device="cpu", task="embed")
    ours = torch.tensor(llm.embed(TEXTS[:2]))
    ref = _reference(qwen3_embedders["headless"], TEXTS[:2], "right")  # the same decoder
    assert F.cosine_similarity(ours, ref, dim=-1).min() > 0.99999


def test_qwen2_embedder_equals_sentence_transformers(tmp_path):
    """gte-Qwen2 style: a headless Qwen2 (q/k/v biases) with sentence-transformers last-token
    pooling and Normalize; equal to transformers' reference and to SentenceTransformer.encode."""
    import transformers
    from sentence_transformers import SentenceTransformer

    (tmp_path / "lm").mkdir()
    lm_dir = build_tiny_model(tmp_path / "lm", "qwen2", seed=5)
    lm = transformers.AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    out = tmp_path / "qwen2-emb"
    tiny_encoders.save_headless(lm, lm_dir, out)
    tiny_encoders.sentence_transformers_files(out, "lasttoken", 64, normalize=True)
    ours = torch.tensor(LLM(str(out), device="cpu").embed(TEXTS))
    ref = _reference(out, TEXTS, "right")
    assert F.cosine_similarity(ours, ref, dim=-1).min() > 0.99999
    st = SentenceTransformer(str(out), device="cpu")
    tiny_encoders.pad_with_eos(st.tokenizer, lm.config.vocab_size)
    st_vecs = torch.from_numpy(st.encode(TEXTS, batch_size=2))
    assert F.cosine_similarity(ours, st_vecs, dim=-1).min() > 0.99999


def test_embeddings_endpoint_serves_a_decoder_embedder(tmp_path, qwen3_embedders):
    path = qwen3_embedders["st"]
    proc = ServerProcess(tmp_path / "server.log", "--served-model-name", "qwen3-emb",
                         model=str(path))
    try:
        server = proc.start()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
        got = client.embeddings.create(model="qwen3-emb", input=TEXTS)
        ours = torch.tensor([d.embedding for d in got.data])
        ref = _reference(path, TEXTS, "left")
        assert F.cosine_similarity(ours, ref, dim=-1).min() > 0.99999
        assert got.usage.prompt_tokens > len(TEXTS)
    finally:
        proc.stop()
