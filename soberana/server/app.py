"""The FastAPI application: routes, API-key check, and the mapping of engine failures to HTTP."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from soberana import __version__
from soberana.server.engine_client import (
    EngineClient,
    EngineDeadError,
    EngineRejectedError,
    QueueFullError,
)
from soberana.server.engine_inputs import render_chat_off_loop
from soberana.server.errors import OpenAIError, bad_request, install_error_handlers
from soberana.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from soberana.server.serving_chat import create_chat_completion
from soberana.server.serving_completion import create_completion
from soberana.server.tenancy import TenantMiddleware

# Paths that answer without the API key: probes and scrapers carry no credentials.


@dataclass
class ServerSettings:
    """What the HTTP layer needs beyond the engine."""

    served_model_names: list[str] | None = None  # None: the engine's model name
    api_keys: list[str] | None = None  # each key is one tenant; None: no authentication
    tenant_header: str | None = None  # trusted header naming the tenant (behind a gateway)
    retry_after_s: int = 1  # Retry-After on a 429


def build_app(engine: EngineClient, settings: ServerSettings) -> FastAPI:
    """The OpenAI-compatible application over a (possibly still starting) engine client."""
    app = FastAPI(title="Soberana", version=__version__, docs_url="/docs", redoc_url=None)
    install_error_handlers(app)
    if settings.api_keys or settings.tenant_header:
        app.add_middleware(TenantMiddleware, api_keys=settings.api_keys or [],
                           tenant_header=settings.tenant_header)
    started = int(time.time())

    def model_names() -> list[str]:
        return settings.served_model_names or [engine.model_info.name]

    def ready_engine(model: str | None = None) -> EngineClient:
        if engine.dead_reason is not None:
            raise OpenAIError(503, f"The engine has stopped: {engine.dead_reason.splitlines()[0]}")
        if not engine.ready:
            raise OpenAIError(503, "The engine is still starting; retry shortly.")
        if model is not None and model not in model_names():
            raise OpenAIError(
                404,
                f"The model `{model}` does not exist. Available: {', '.join(model_names())}.",
                type="invalid_request_error",
                param="model",
                code="model_not_found",
            )
        return engine

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return OpenAIError(503, f"The engine has stopped: {str(exc).splitlines()[0]}").response()

    @app.exception_handler(EngineRejectedError)
    async def _rejected(_: Request, exc: EngineRejectedError) -> JSONResponse:
        return bad_request(str(exc)).response()

    @app.exception_handler(QueueFullError)
    async def _full(_: Request, exc: QueueFullError) -> JSONResponse:
        headers = {"Retry-After": str(settings.retry_after_s)}
        return OpenAIError(429, str(exc), code="rate_limit_exceeded", headers=headers).response()

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 once the engine is ready; 503 while starting and after a fatal engine error."""
        ready_engine()
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    @app.get("/metrics")
    async def metrics() -> Response:
        body = engine.metrics.render() if engine.metrics is not None else b""
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        info = ready_engine().model_info
        data = [
            {
                "id": name,
                "object": "model",
                "created": started,
                "owned_by": "soberana",
                "root": info.path,
                "parent": None,
                "max_model_len": info.max_model_len,
                # which scheme and kernels serve the weights, and the KV cache's dtype
                "quantization": info.quantization,
                "quantization_kernels": info.quantization_kernels,
                "kv_cache_dtype": info.kv_cache_dtype,
            }
            for name in model_names()
        ]
        return JSONResponse({"object": "list", "data": data})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        ready_engine(body.model)
        return await create_chat_completion(body, request, engine, body.model or model_names()[0])

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        ready_engine(body.model)
        return await create_completion(body, request, engine, body.model or model_names()[0])

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> JSONResponse:
        """Token ids of a prompt, or of chat messages rendered with the chat template."""
        info = ready_engine(body.model).model_info
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            prompt = await render_chat_off_loop(engine, body)
            tokens = prompt.token_ids
        else:
            encode = functools.partial(
                engine.tokenizer.encode, add_special_tokens=body.add_special_tokens
            )
            tokens = await engine.run_tokenizer(len(body.prompt), encode, body.prompt)
        return JSONResponse(
            {"tokens": tokens, "count": len(tokens), "max_model_len": info.max_model_len}
        )

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> JSONResponse:
        """Text of a list of token ids."""
        info = ready_engine(body.model).model_info
        unknown = [t for t in body.tokens if t >= info.vocab_size]
        if unknown:
            raise bad_request(
                f"tokens holds {unknown[0]}, outside the vocabulary [0, {info.vocab_size - 1}]",
                param="tokens",
            )
        # ~4 characters per token: the size run_tokenizer weighs.
        decode = engine.tokenizer.decode
        text = await engine.run_tokenizer(4 * len(body.tokens), decode, body.tokens)
        return JSONResponse({"prompt": text})

    return app
