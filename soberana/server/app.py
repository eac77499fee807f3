"""The FastAPI application: routes, API-key check, and the mapping of engine failures to HTTP."""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from soberana import __version__
from soberana.server import responses as r
from soberana.server.anthropic_protocol import CountTokensRequest, MessagesRequest
from soberana.server.body_limit import RequestBodyLimit
from soberana.server.docs import install_docs
from soberana.server.engine_client import (
    EngineClient,
    EngineDeadError,
    EngineRejectedError,
    QueueFullError,
    ServerShuttingDownError,
)
from soberana.server.engine_inputs import check_prompt_chars, render_chat_off_loop
from soberana.server.errors import OpenAIError, bad_request, install_error_handlers
from soberana.server.ops_metrics import render_engine_up
from soberana.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from soberana.server.request_log import RequestLogMiddleware, note_model
from soberana.server.serving_chat import create_chat_completion
from soberana.server.serving_completion import create_completion
from soberana.server.serving_messages import anthropic_error, count_tokens, create_message
from soberana.server.serving_pooling import add_pooling_routes, require_task
from soberana.server.streaming import cancel_on_disconnect
from soberana.server.tenancy import TenantMiddleware
from soberana.telemetry.collector import GPUCollector
from soberana.tracing import Tracing


@dataclass
class ServerSettings:
    """What the HTTP layer needs beyond the engine."""

    served_model_names: list[str] | None = None  # None: the engine's model name
    api_keys: list[str] | None = None  # each key is one tenant; None: no authentication
    tenant_header: str | None = None  # names a sub-tenant within the key's tenant
    retry_after_s: int = 1  # Retry-After on a 429
    # Keys the tenants' cache salts (HMAC); random unless the operator shares one.
    salt_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    allowed_origins: list[str] | None = None  # CORS; None: browsers on other origins refused
    max_request_body_bytes: int = 32 * 2**20
    gpu_telemetry: GPUCollector | None = None  # DCGM-named GPU series appended to /metrics
    tracing: Tracing | None = None  # OpenTelemetry spans per request, when configured


def build_app(engine: EngineClient, settings: ServerSettings) -> FastAPI:
    """The OpenAI-compatible application over a (possibly still starting) engine client."""
    app = FastAPI(title="Soberana", version=__version__, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    install_docs(app)
    # Middleware runs outermost-last-added: CORS answers preflights before any key check; the
    # body limit refuses an oversized body before anything reads it.
    app.add_middleware(TenantMiddleware, api_keys=settings.api_keys or [],
                       tenant_header=settings.tenant_header, salt_secret=settings.salt_secret)
    app.add_middleware(RequestBodyLimit, max_bytes=settings.max_request_body_bytes)
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_methods=["GET", "POST", "HEAD", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=["Retry-After"],
            max_age=600,
        )
    # Outermost, so refusals (401, 404, 413) get their request id and line too.
    app.add_middleware(RequestLogMiddleware, quiet_paths=("/health", "/metrics"),
                       tracing=settings.tracing)
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

    @app.exception_handler(ServerShuttingDownError)
    async def _shutting_down(_: Request, exc: ServerShuttingDownError) -> JSONResponse:
        return OpenAIError(503, str(exc), code="server_shutting_down").response()

    @app.exception_handler(EngineRejectedError)
    async def _rejected(_: Request, exc: EngineRejectedError) -> JSONResponse:
        return bad_request(str(exc)).response()

    @app.exception_handler(QueueFullError)
    async def _full(_: Request, exc: QueueFullError) -> JSONResponse:
        headers = {"Retry-After": str(settings.retry_after_s)}
        return OpenAIError(429, str(exc), code="rate_limit_exceeded", headers=headers).response()

    def model_card(name: str) -> dict:
        info = engine.model_info
        return {
            "id": name,
            "object": "model",
            "created": started,
            "owned_by": "soberana",
            "root": info.path,
            "parent": None,
            "max_model_len": info.max_model_len,
            "task": info.task,  # generate, embed or rerank
            # which scheme and kernels serve the weights, and the KV cache's dtype
            "quantization": info.quantization,
            "quantization_kernels": info.quantization_kernels,
            "kv_cache_dtype": info.kv_cache_dtype,
            # which implementations serve the ops (compute backend, kernels, slower paths)
            "compute": info.compute,
        }

    async def until_disconnect(request: Request, work: Awaitable[Response]) -> Response:
        # A client that leaves while its prompt is rendered or tokenized stops that work.
        result = await cancel_on_disconnect(work, request.receive)
        return Response(status_code=499) if result is None else result

    @app.get("/health", responses={200: {"model": r.HealthResponse}, 503: r.API_ERRORS[503]})
    async def health() -> JSONResponse:
        """200 once the engine is ready; 503 while starting and after a fatal engine error."""
        ready_engine()
        return JSONResponse({"status": "ok"})

    # HEAD for probes that send it (load balancers); same status, no body.
    app.head("/health", responses={200: {"description": "Ready"}, 503: r.API_ERRORS[503]},
             operation_id="health_head")(health)

    @app.get("/version", responses={200: {"model": r.VersionResponse}})
    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    @app.get(
        "/metrics", response_class=PlainTextResponse,
        responses={200: {"description": "Prometheus text exposition format (vLLM's names)"}},
    )
    async def metrics() -> Response:
        body = engine.metrics.render() if engine.metrics is not None else b""
        body += render_engine_up(engine)
        if settings.gpu_telemetry is not None:
            body += settings.gpu_telemetry.render()
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses={200: {"model": r.ModelList}, 401: r.API_ERRORS[401],
                                      503: r.API_ERRORS[503]})
    async def list_models() -> JSONResponse:
        ready_engine()
        return JSONResponse({"object": "list", "data": [model_card(n) for n in model_names()]})

    @app.get("/v1/models/{model_id:path}", responses={200: {"model": r.ModelCard},
                                                        **r.API_ERRORS})
    async def retrieve_model(model_id: str) -> JSONResponse:
        """One model by id (`client.models.retrieve`)."""
        ready_engine(model_id)
        return JSONResponse(model_card(model_id))

    @app.post(
        "/v1/chat/completions",
        responses={**r.API_ERRORS, **r.streamed(r.ChatCompletion, "The completion, or its chunks")},
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        require_task(ready_engine(body.model), "/v1/chat/completions", "generate")
        check_prompt_chars(engine, [body.messages], "messages")
        model = body.model or model_names()[0]
        note_model(model)
        return await until_disconnect(
            request, create_chat_completion(body, request, engine, model)
        )

    @app.post(
        "/v1/completions",
        responses={**r.API_ERRORS, **r.streamed(r.Completion, "The completion, or its chunks")},
    )
    async def completions(body: CompletionRequest, request: Request) -> Response:
        require_task(ready_engine(body.model), "/v1/completions", "generate")
        check_prompt_chars(engine, body.prompt, "prompt")
        model = body.model or model_names()[0]
        note_model(model)
        return await until_disconnect(request, create_completion(body, request, engine, model))

    add_pooling_routes(app, ready_engine, model_names)

    @app.post("/v1/messages")
    async def messages(body: MessagesRequest, request: Request) -> Response:
        """Anthropic's Messages API over the same engine (errors in Anthropic's shape)."""
        try:
            require_task(ready_engine(body.model), "/v1/messages", "generate")
            return await create_message(body, request, engine, body.model)
        except OpenAIError as exc:
            return anthropic_error(exc)

    @app.post("/v1/messages/count_tokens")
    async def messages_count_tokens(body: CountTokensRequest) -> Response:
        try:
            ready_engine(body.model)
            return await count_tokens(body, engine)
        except OpenAIError as exc:
            return anthropic_error(exc)

    @app.post("/tokenize", responses={200: {"model": r.TokenizeResponse}, **r.API_ERRORS})
    async def tokenize(body: TokenizeRequest, request: Request) -> Response:
        """Token ids of a prompt, or of chat messages rendered with the chat template."""
        info = ready_engine(body.model).model_info
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of prompt or messages", param="prompt")

        async def work() -> Response:
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

        return await until_disconnect(request, work())

    @app.post("/detokenize", responses={200: {"model": r.DetokenizeResponse}, **r.API_ERRORS})
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
