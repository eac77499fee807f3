"""Request bodies of the embedding and scoring endpoints: OpenAI's `/v1/embeddings`, the
Cohere/Jina `/v1/rerank` shape and vLLM's `/v1/score`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from soberana.server.protocol import RequestBody


class _Request(RequestBody):  # extra fields refused, lone surrogates a 400

    model: str | None = None
    # Keep at most this many tokens of each input (right side cut, special tokens kept);
    # -1: the model's limit. Without it an over-long input is a 400.
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    user: str | None = None


class EmbeddingRequest(_Request):
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)


class RerankDocument(BaseModel):
    text: str


class RerankRequest(_Request):
    query: str
    documents: list[str | RerankDocument]
    top_n: int | None = Field(default=None, ge=0)
    return_documents: bool = True


class ScoreRequest(_Request):
    text_1: str | list[str]
    text_2: str | list[str]


# Responses, as documented in /openapi.json.


class _Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingData(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32")


class EmbeddingResponse(BaseModel):
    object: Literal["list"]
    data: list[EmbeddingData]
    model: str
    usage: _Usage


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankResponse(BaseModel):
    id: str
    model: str
    usage: dict[str, int]
    results: list[RerankResult]


class ScoreData(BaseModel):
    index: int
    object: Literal["score"]
    score: float


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"]
    model: str
    data: list[ScoreData]
    usage: _Usage
