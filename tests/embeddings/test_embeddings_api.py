"""`soberana serve` of an embedding model and of a cross-encoder, through real HTTP and the
official `openai` client: /v1/embeddings, /v1/rerank, /v1/score, and the errors of each."""

from __future__ import annotations

import random

import numpy as np
import openai
import pytest
import torch
from sentence_transformers import CrossEncoder, SentenceTransformer

from tests.server.helpers import API_KEY, ServerProcess

WORDS = ("sovereign inference keeps prompts and models on hardware that the organisation "
         "controls banks hospitals público datos ñandú café naïve 2026 GPU CPU embeddings").split()


def _sentences(n: int, seed: int = 0, max_words: int = 120) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words)))
            for _ in range(n)]


@pytest.fixture(scope="module")
def embed_server(tmp_path_factory, minilm):
    proc = ServerProcess(tmp_path_factory.mktemp("embed") / "server.log",
                         "--served-model-name", "minilm", model=str(minilm))
    try:
        yield proc.start()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def embed_client(embed_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{embed_server.url}/v1", api_key=API_KEY, max_retries=0)


def test_embeddings_equal_sentence_transformers_through_the_openai_client(embed_client, minilm):
    texts = _sentences(200, max_words=60)
    # The openai client asks for base64 by default and decodes it: both encodings are covered.
    response = embed_client.embeddings.create(model="minilm", input=texts)
    assert [d.index for d in response.data] == list(range(len(texts)))
    ours = torch.tensor([d.embedding for d in response.data])
    ref = torch.tensor(SentenceTransformer(str(minilm), device="cpu").encode(texts))
    cos = torch.nn.functional.cosine_similarity(ours, ref)
    assert cos.min() > 0.99999, cos.min()
    assert response.usage.prompt_tokens == response.usage.total_tokens > len(texts)


def test_float_and_base64_encodings_carry_the_same_vector(embed_server):
    body = {"model": "minilm", "input": "the same sentence"}
    as_float = embed_server.post("/v1/embeddings", json=body).json()["data"][0]["embedding"]
    b64 = embed_server.post("/v1/embeddings", json={**body, "encoding_format": "base64"})
    import base64

    decoded = np.frombuffer(base64.b64decode(b64.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, np.array(as_float, dtype=np.float32), rtol=0, atol=0)


def test_dimensions_truncates_and_renormalises(embed_client):
    full = embed_client.embeddings.create(model="minilm", input="truncate me").data[0].embedding
    short = embed_client.embeddings.create(model="minilm", input="truncate me",
                                           dimensions=64).data[0].embedding
    assert len(full) == 384 and len(short) == 64
    head = np.array(full[:64])
    np.testing.assert_allclose(np.array(short), head / np.linalg.norm(head), atol=1e-6)
    with pytest.raises(openai.BadRequestError, match="dimensions must be at most 384"):
        embed_client.embeddings.create(model="minilm", input="x", dimensions=385)


def test_token_id_inputs_embed_as_their_text(embed_server, embed_client):
    ids = embed_server.post("/tokenize", json={"prompt": "hello there"}).json()["tokens"]
    by_ids = embed_client.embeddings.create(model="minilm", input=[ids]).data[0].embedding
    by_text = embed_client.embeddings.create(model="minilm", input="hello there").data[0].embedding
    np.testing.assert_allclose(by_ids, by_text, atol=1e-6)


@pytest.mark.parametrize("body, message", [
    ({"input": []}, "input must not be empty"),
    ({"input": "word " * 400}, "limit is 256"),
    ({"input": [[1, 2, 10**6]]}, "outside the vocabulary"),
    ({"input": [[]]}, "is empty"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "x", "dimensions": 0}, "dimensions"),
])
def test_bad_inputs_get_an_openai_shaped_400(embed_server, body, message):
    response = embed_server.post("/v1/embeddings", json={"model": "minilm", **body})
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_truncate_prompt_tokens_cuts_an_overlong_input(embed_server):
    body = {"model": "minilm", "input": "word " * 400, "truncate_prompt_tokens": -1}
    response = embed_server.post("/v1/embeddings", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == 256


def test_a_batch_of_ten_thousand_inputs_is_served_in_order(embed_server):
    texts = [f"{i} {WORDS[i % len(WORDS)]}" for i in range(10_000)]
    response = embed_server.post("/v1/embeddings", json={"model": "minilm", "input": texts},
                                 timeout=300)
    assert response.status_code == 200, response.text[:500]
    data = response.json()["data"]
    assert [d["index"] for d in data] == list(range(10_000))
    # Identical texts in different positions get identical vectors: no row was mixed up.
    again = embed_server.post("/v1/embeddings", json={"model": "minilm",
                                                      "input": [texts[9_999], texts[0]]}).json()
    np.testing.assert_allclose(again["data"][0]["embedding"], data[9_999]["embedding"], atol=1e-5)
    np.testing.assert_allclose(again["data"][1]["embedding"], data[0]["embedding"], atol=1e-5)


def test_generation_endpoints_refuse_an_embedding_model(embed_server):
    response = embed_server.post("/v1/chat/completions", json={
        "model": "minilm", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 400
    assert "serves task embed" in response.json()["error"]["message"]


def test_rerank_and_score_with_an_embedder_use_cosine(embed_server):
    docs = ["Paris is the capital of France.", "Bananas are yellow.", "The Eiffel tower."]
    body = {"model": "minilm", "query": "What is the capital of France?", "documents": docs,
            "top_n": 2}
    ranked = embed_server.post("/v1/rerank", json=body).json()
    assert [r["index"] for r in ranked["results"]][0] == 0 and len(ranked["results"]) == 2
    assert ranked["results"][0]["document"]["text"] == docs[0]
    scores = embed_server.post("/v1/score", json={"model": "minilm", "text_1": body["query"],
                                                  "text_2": docs}).json()["data"]
    by_index = {r["index"]: r["relevance_score"] for r in ranked["results"]}
    for i, score in by_index.items():
        assert scores[i]["score"] == pytest.approx(score, abs=1e-9)
    bad = embed_server.post("/v1/score", json={"text_1": ["a", "b"], "text_2": ["c"]})
    assert bad.status_code == 400 and "text_1 has 2 texts" in bad.json()["error"]["message"]


def test_embedding_requests_are_counted_in_metrics(embed_server):
    def prompt_tokens() -> float:
        return sum(v for k, v in embed_server.metrics().items()
                   if k.startswith("vllm:prompt_tokens_total{"))

    before = prompt_tokens()
    used = embed_server.post("/v1/embeddings", json={"input": ["one", "two three"]}).json()
    assert prompt_tokens() - before == used["usage"]["prompt_tokens"]


def test_cross_encoder_server_reranks_as_sentence_transformers(tmp_path, tiny_encoder):
    path = tiny_encoder("bert-cross")
    proc = ServerProcess(tmp_path / "server.log", "--served-model-name", "cross", model=str(path))
    try:
        proc.start()
        query = "What is the capital of France?"
        docs = ["Paris is the capital of France.", "Bananas are yellow.", "France", "capital"]
        ranked = proc.post("/v1/rerank", json={"query": query, "documents": docs,
                                               "return_documents": False}).json()
        ref = CrossEncoder(str(path), device="cpu").predict([(query, d) for d in docs])
        assert [r["index"] for r in ranked["results"]] == sorted(range(4), key=lambda i: -ref[i])
        for r in ranked["results"]:
            assert "document" not in r
            assert r["relevance_score"] == pytest.approx(float(ref[r["index"]]), abs=1e-5)
        refused = proc.post("/v1/embeddings", json={"input": "x"})
        assert refused.status_code == 400 and "serves task rerank" in refused.text
    finally:
        proc.stop()


def test_openapi_documents_the_pooling_answers(embed_server):
    import httpx
    import jsonschema

    openapi = httpx.get(f"{embed_server.url}/openapi.json", timeout=30).json()
    answers = {
        "/v1/embeddings": embed_server.post("/v1/embeddings", json={"input": "doc"}),
        "/v1/rerank": embed_server.post("/v1/rerank", json={"query": "q", "documents": ["d"]}),
        "/v1/score": embed_server.post("/v1/score", json={"text_1": "q", "text_2": ["d"]}),
    }
    for path, answer in answers.items():
        responses = openapi["paths"][path]["post"]["responses"]
        assert "422" not in responses and "400" in responses
        ref = responses["200"]["content"]["application/json"]["schema"]["$ref"]
        document = {"$ref": ref, "components": openapi["components"]}
        jsonschema.validate(answer.json(), document, cls=jsonschema.Draft202012Validator)
