"""Response bodies, as pydantic models: they describe the API in /openapi.json, so generated
clients get types. Handlers build plain dicts of these shapes (no validation per token)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Open(BaseModel):
    # New fields can appear (as in OpenAI's API): clients must ignore what they do not know.
    model_config = ConfigDict(extra="allow")


class ErrorObject(_Open):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Open):
    """Every failure: `{"error": {...}}`, as OpenAI's API answers."""

    error: ErrorObject


class PromptTokensDetails(_Open):
    cached_tokens: int


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ComputeCard(_Open):
    """Which implementations serve the model's ops, chosen once at start (ops/backend.py)."""

    compute_backend: str  # "native", "triton" or "torch": what serves
    requested: str  # --compute-backend as given ("auto" by default)
    kernels: dict[str, str]  # op -> implementation, e.g. "attention": "native AVX-512"
    fallbacks: list[str]  # slower paths taken, each with its reason


class ModelCard(_Open):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    compute: ComputeCard | None = None


class ModelList(_Open):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TopLogprob(_Open):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Open):
    content: list[TokenLogprob] | None


class AssistantMessage(_Open):
    role: Literal["assistant"]
    content: str | None


class ChatChoice(_Open):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    stop_reason: int | str | None = None


class ChatCompletion(_Open):
    """Body of a non-streaming chat completion."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Open):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Open):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None
    stop_reason: int | str | None = None


class ChatCompletionChunk(_Open):
    """One `data:` event of a streamed chat completion (`stream: true`)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(_Open):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Open):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    stop_reason: int | str | None = None


class Completion(_Open):
    """Body of a non-streaming completion; a streamed one sends events of this shape
    (`finish_reason` null until each choice ends)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TokenizeResponse(_Open):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(_Open):
    prompt: str


class HealthResponse(_Open):
    status: Literal["ok"]


class VersionResponse(_Open):
    version: str


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


# The failures every API route can answer; 400 (not FastAPI's 422) for any invalid body.
API_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("Invalid request: the error names the parameter"),
    401: _error("Missing or wrong API key (when the server requires one)"),
    404: _error("Unknown model"),
    413: _error("Request body larger than --max-request-body-mb"),
    429: _error("Too many requests waiting; retry after Retry-After seconds"),
    503: _error("The engine is starting, has stopped, or the server is shutting down"),
}


def streamed(model: type[BaseModel], description: str) -> dict[int | str, dict[str, Any]]:
    """A 200 that is JSON of `model`, or (with `stream: true`) server-sent events."""
    sse = {
        "schema": {
            "type": "string",
            "description": "Server-sent events: `data: {json}` lines, each one chunk object, "
            "then `data: [DONE]`; a failure after the first event is a `data: {\"error\": ...}` "
            "event before `[DONE]`.",
        }
    }
    return {200: {"model": model, "description": description, "content": {"text/event-stream": sse}}}
