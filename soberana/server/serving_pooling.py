"""`/v1/embeddings`, `/v1/rerank` (also `/rerank`, `/v2/rerank`) and `/v1/score` (also `/score`).

Every input of a request is its own engine input, so the core packs inputs of many requests
into one batch. An embedder scores by cosine similarity of the two texts' embeddings; a
cross-encoder reads each (query, document) pair together and its classifier scores it.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import math
import time
import uuid
from collections.abc import Awaitable, Callable

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from soberana.engine.outputs import PoolingOutput
from soberana.models.pooling import cosine
from soberana.server import responses as r
from soberana.server.engine_client import EngineClient
from soberana.server.errors import bad_request
from soberana.server.protocol_pooling import (
    EmbeddingRequest,
    EmbeddingResponse,
    RerankRequest,
    RerankResponse,
    ScoreRequest,
    ScoreResponse,
)
from soberana.server.streaming import cancel_on_disconnect

Pair = tuple[list[int], list[int] | None]


def require_task(engine: EngineClient, endpoint: str, *tasks: str) -> None:
    """A 400 naming the model's task when `endpoint` needs another one."""
    task = engine.model_info.task
    if task not in tasks:
        raise bad_request(
            f"{endpoint} needs a model with task {' or '.join(tasks)}; "
            f"{engine.model_info.name} serves task {task}",
            param="model",
        )


def add_pooling_routes(
    app: FastAPI, ready_engine: Callable[[str | None], EngineClient],
    model_names: Callable[[], list[str]],
) -> None:
    """Register the embedding and scoring endpoints on `app`. A client that leaves cancels its
    request, and its inputs still queued in the engine are dropped (`_run`)."""

    @app.post("/v1/embeddings", responses={200: {"model": EmbeddingResponse}, **r.API_ERRORS})
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        return await _until_disconnect(request, _embeddings(body))

    async def _embeddings(body: EmbeddingRequest) -> Response:
        engine = ready_engine(body.model)
        require_task(engine, "/v1/embeddings", "embed")
        started = time.time()
        inputs = await _tokenize(engine, body.input, body.truncate_prompt_tokens)
        outputs = await _run(engine, [(ids, None) for ids in inputs])
        data = []
        for i, out in enumerate(outputs):
            vector = _truncate_dimensions(engine, out.embedding, body.dimensions)
            data.append({"object": "embedding", "index": i,
                         "embedding": _encode(vector, body.encoding_format)})
        # orjson, float32 arrays: json.dumps of 384 doubles took ~280 us a request, a quarter
        # of the API process's work per one-sentence request (Emerald Rapids); orjson writes
        # each float32's shortest repr (~17 us), half the bytes the client parses
        return Response(orjson.dumps({
            "object": "list", "data": data, "model": body.model or model_names()[0],
            "usage": _usage(engine, outputs, started),
        }, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")

    async def rerank(body: RerankRequest, request: Request) -> Response:
        return await _until_disconnect(request, _rerank(body))

    async def _rerank(body: RerankRequest) -> JSONResponse:
        engine = ready_engine(body.model)
        require_task(engine, "rerank", "embed", "rerank")
        started = time.time()
        documents = [d if isinstance(d, str) else d.text for d in body.documents]
        scores, outputs = await _score(engine, [body.query] * len(documents), documents,
                                       body.truncate_prompt_tokens)
        order = sorted(range(len(documents)), key=lambda i: -scores[i])
        if body.top_n is not None:
            order = order[: body.top_n]
        results = []
        for i in order:
            result = {"index": i, "relevance_score": scores[i]}
            if body.return_documents:
                result["document"] = {"text": documents[i]}
            results.append(result)
        usage = _usage(engine, outputs, started)
        return JSONResponse({
            "id": f"rerank-{uuid.uuid4().hex}", "model": body.model or model_names()[0],
            "usage": {"total_tokens": usage["total_tokens"]}, "results": results,
        })

    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        app.post(path, responses={200: {"model": RerankResponse}, **r.API_ERRORS})(rerank)

    async def score(body: ScoreRequest, request: Request) -> Response:
        return await _until_disconnect(request, _score_route(body))

    async def _score_route(body: ScoreRequest) -> JSONResponse:
        engine = ready_engine(body.model)
        require_task(engine, "score", "embed", "rerank")
        started = time.time()
        left, right = _score_pairs(body.text_1, body.text_2)
        scores, outputs = await _score(engine, left, right, body.truncate_prompt_tokens)
        return JSONResponse({
            "id": f"score-{uuid.uuid4().hex}", "object": "list",
            "model": body.model or model_names()[0],
            "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
            "usage": _usage(engine, outputs, started),
        })

    for path in ("/v1/score", "/score"):
        app.post(path, responses={200: {"model": ScoreResponse}, **r.API_ERRORS})(score)


async def _until_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    result = await cancel_on_disconnect(work, request.receive)
    return Response(status_code=499) if result is None else result


def _score_pairs(text_1: str | list[str], text_2: str | list[str]) -> tuple[list[str], list[str]]:
    """1:1, 1:N or N:N pairs (vLLM's rule)."""
    right = [text_2] if isinstance(text_2, str) else text_2
    if isinstance(text_1, str):
        left = [text_1] * len(right)
    elif len(text_1) == len(right):
        left = text_1
    else:
        raise bad_request(
            f"text_1 has {len(text_1)} texts and text_2 {len(right)}: give one text_1 for any "
            "number of text_2, or as many of each", param="text_1")
    if not right:
        raise bad_request("text_2 must not be empty", param="text_2")
    return left, right


async def _score(engine: EngineClient, left: list[str], right: list[str],
                 truncate: int | None) -> tuple[list[float], list[PoolingOutput]]:
    """A score per (left[i], right[i]): a cross-encoder's, or the embeddings' cosine."""
    if not right:
        raise bad_request("documents must not be empty", param="documents")
    if engine.model_info.task == "rerank":
        pairs = await _tokenize_pairs(engine, left, right, truncate)
        outputs = await _run(engine, pairs)
        return [out.score for out in outputs], outputs
    texts = list(dict.fromkeys(left + right))  # each distinct text embedded once
    ids = await _tokenize(engine, texts, truncate, param="documents")
    outputs = await _run(engine, [(i, None) for i in ids])
    vectors = dict(zip(texts, (out.embedding for out in outputs)))
    return [cosine(vectors[a], vectors[b]) for a, b in zip(left, right)], outputs


def _max_tokens(engine: EngineClient, truncate: int | None) -> int | None:
    """The length inputs are cut to (None: no cut), at most the model's limit."""
    limit = engine.model_info.max_model_len
    if truncate is None:
        return None
    return limit if truncate == -1 else min(truncate, limit)


async def _tokenize(engine: EngineClient, value: str | list, truncate: int | None,
                    param: str = "input") -> list[list[int]]:
    """Token ids of each input: texts through the tokenizer (with special tokens), token-id
    lists as given."""
    if isinstance(value, str):
        value = [value]
    if not value:
        raise bad_request(f"{param} must not be empty", param=param)
    if isinstance(value[0], int) or isinstance(value[0], list):
        ids = [value] if isinstance(value[0], int) else value
        _check_ids(engine, ids, param)
        cut = _max_tokens(engine, truncate)
        ids = [seq[:cut] if cut else seq for seq in ids]
    else:
        cut = _max_tokens(engine, truncate)
        encode = functools.partial(engine.tokenizer, add_special_tokens=True,
                                   truncation=cut is not None, max_length=cut)
        encoded = await engine.run_tokenizer(sum(map(len, value)), encode, value)
        ids = encoded["input_ids"]
    _check_lengths(engine, ids, param)
    return ids


async def _tokenize_pairs(engine: EngineClient, left: list[str], right: list[str],
                          truncate: int | None) -> list[Pair]:
    cut = _max_tokens(engine, truncate)
    encode = functools.partial(engine.tokenizer, add_special_tokens=True,
                               truncation="only_second" if cut else False, max_length=cut)
    num_chars = sum(map(len, left)) + sum(map(len, right))
    encoded = await engine.run_tokenizer(num_chars, encode, left, right)
    ids = encoded["input_ids"]
    _check_lengths(engine, ids, "documents")
    types = encoded.get("token_type_ids") or [None] * len(ids)
    return list(zip(ids, types))


def _check_ids(engine: EngineClient, ids: list[list[int]], param: str) -> None:
    vocab = engine.model_info.vocab_size
    for i, seq in enumerate(ids):
        if not seq:
            raise bad_request(f"{param}[{i}] is empty", param=param)
        bad = [t for t in seq if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise bad_request(f"{param}[{i}] holds token id {bad[0]}, outside the vocabulary "
                              f"[0, {vocab - 1}]", param=param)


def _check_lengths(engine: EngineClient, ids: list[list[int]], param: str) -> None:
    limit = engine.model_info.max_model_len
    for i, seq in enumerate(ids):
        if len(seq) > limit:
            raise bad_request(
                f"{param}[{i}] has {len(seq)} tokens; this model's limit is {limit} "
                "(set truncate_prompt_tokens to cut inputs to it)", param=param)


async def _run(engine: EngineClient, items: list[Pair]) -> list[PoolingOutput]:
    engine.check_capacity(1)
    base = f"pool-{uuid.uuid4().hex}"
    ids = [f"{base}-{i}" for i in range(len(items))]
    futures = [engine.add_pooling_request(rid, tokens, types)
               for rid, (tokens, types) in zip(ids, items)]
    try:
        return list(await asyncio.gather(*futures))
    except BaseException:
        engine.abort_pooling(ids)  # the client left, or one input was refused: drop the rest
        raise


def _usage(engine: EngineClient, outputs: list[PoolingOutput], started: float) -> dict:
    tokens = sum(out.num_prompt_tokens for out in outputs)
    if engine.metrics is not None:
        engine.metrics.record_pooling(tokens, time.time() - started)
    return {"prompt_tokens": tokens, "total_tokens": tokens}


def _truncate_dimensions(engine: EngineClient, vector: list[float],
                         dimensions: int | None) -> list[float]:
    """Matryoshka truncation: the first `dimensions` values, re-normalised."""
    if dimensions is None:
        return vector
    if dimensions > len(vector):
        raise bad_request(f"dimensions must be at most {len(vector)} for "
                          f"{engine.model_info.name}; got {dimensions}", param="dimensions")
    head = vector[:dimensions]
    norm = math.sqrt(sum(x * x for x in head))
    return [x / norm for x in head] if norm else head


def _encode(vector: list[float], encoding_format: str) -> np.ndarray | str:
    """The embedding as the answer carries it: float32 (a JSON array through orjson) or
    base64 of its little-endian float32 bytes, as OpenAI sends it."""
    values = np.asarray(vector, dtype="<f4")
    return base64.b64encode(values.tobytes()).decode() if encoding_format == "base64" else values
