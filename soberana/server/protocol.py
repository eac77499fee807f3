"""Request bodies of the OpenAI-compatible API, validated strictly ("16" is not an integer)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from soberana.engine.sampling_params import MAX_LOGPROBS, MAX_N

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_PROMPTS = 256  # prompts in one /v1/completions batch
MAX_STOP = 16  # stop strings per request
MAX_SALT_CHARS = 256

Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
TokenId = Annotated[int, Field(ge=0, le=INT64_MAX)]
StopStr = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class StrictModel(BaseModel):
    """Base of every body: unknown fields and type coercion are errors, NaN/inf too."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class RequestBody(StrictModel):
    """Base of every request body: also refuses text that is not Unicode."""

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data: Any) -> Any:
        # JSON may escape half of a surrogate pair ("\ud800", what a JavaScript client sends
        # when it cuts an emoji); no tokenizer or UTF-8 encoder accepts such a string.
        param = lone_surrogate_path(data)
        if param is not None:
            raise PydanticCustomError(
                "invalid_unicode",
                "{param} holds a lone UTF-16 surrogate (half of an escaped character pair), "
                "which is not valid Unicode",
                {"param": param},
            )
        return data


_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate_path(value: Any, path: str = "") -> str | None:
    """Where in a parsed JSON value a string holds a lone surrogate (dotted path), if anywhere."""
    if isinstance(value, str):
        return path if not value.isascii() and _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            name = str(key).encode("utf-8", "backslashreplace").decode()
            sub = f"{path}.{name}" if path else name
            if lone_surrogate_path(key) is not None:
                return sub
            found = lone_surrogate_path(item, sub)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, (str, list, dict)):
                found = lone_surrogate_path(item, f"{path}.{i}" if path else str(i))
                if found is not None:
                    return found
    return None


class ResponseFormat(StrictModel):
    """OpenAI's response_format: text, json_object, or json_schema {name, schema, strict}."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class JsonSchemaFormat(StrictModel):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class StructuredOutputsField(StrictModel):
    """vLLM's structured_outputs: exactly one of json, regex, choice, grammar, json_object."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1)] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class StreamOptions(StrictModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(RequestBody):
    """Parameters shared by chat and completions: OpenAI's, then vLLM's extras."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: StopStr | Annotated[list[StopStr], Field(max_length=MAX_STOP)] | None = None
    seed: Int64 | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int = Field(0, ge=-1, le=2**31 - 1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0**16)
    min_tokens: int = Field(0, ge=0, le=2**31 - 1)
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[TokenId], Field(max_length=1024)] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: Int64 = 0
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_SALT_CHARS)
    # OpenAI parameters Soberana does not implement: accepted only at their neutral value
    # (see `unsupported_params`), so a client relying on one gets a 400 naming it.
    logit_bias: dict[str, Any] | None = None
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    # Structured outputs (soberana/server/structured_request.py): OpenAI's response_format,
    # vLLM's structured_outputs and its older guided_* aliases.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # OpenAI's newer fields that change nothing here; accepted as OpenAI accepts them.
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class TextPart(StrictModel):
    """One part of a message's content; only `text` parts are supported."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class FunctionCall(StrictModel):
    name: str = Field(min_length=1)
    arguments: str


class ToolCall(StrictModel):
    """A call in an assistant message of the history (as the API returned it)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    # What `message.model_dump()` of an OpenAI answer carries: harmless when null.
    refusal: str | None = None
    audio: Any = None
    function_call: Any = None
    annotations: list[Any] | None = None


class FunctionDefinition(StrictModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    """Body of POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # vLLM's chat extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: Annotated[list[ChatTool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    # unsupported unless neutral
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: str | None = None
    web_search_options: Any = None


class CompletionRequest(SamplingFields):
    """Body of POST /v1/completions."""

    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    max_tokens: int | None = Field(16, ge=1, le=INT64_MAX)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    add_special_tokens: bool = True
    # unsupported unless neutral
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)


class TokenizeRequest(RequestBody):
    """Body of POST /tokenize: a prompt, or chat messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    add_special_tokens: bool = True
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(RequestBody):
    """Body of POST /detokenize."""

    model: str | None = None
    tokens: list[TokenId]


def unsupported_params(body: SamplingFields) -> list[str]:
    """Names of parameters set to something Soberana cannot honour (never silently ignored)."""
    found = []
    if body.logit_bias:
        found.append("logit_bias")
    if body.service_tier not in (None, "auto", "default"):
        found.append("service_tier")
    if body.store:
        found.append("store")
    if body.metadata:
        found.append("metadata")
    if isinstance(body, ChatCompletionRequest):
        if body.functions:
            found.append("functions")
        if body.function_call not in (None, "none"):
            found.append("function_call")
        if body.modalities not in (None, ["text"]):
            found.append("modalities")
        for name in ("audio", "prediction", "reasoning_effort", "web_search_options"):
            if getattr(body, name) is not None:
                found.append(name)
        for i, message in enumerate(body.messages):
            if message.role == "function":
                found.append(f"messages.{i}.role")
            if message.audio is not None:
                found.append(f"messages.{i}.audio")
            if message.function_call is not None:
                found.append(f"messages.{i}.function_call")
            if isinstance(message.content, list):
                for j, part in enumerate(message.content):
                    if part.type != "text" or part.text is None:
                        found.append(f"messages.{i}.content.{j}.type")
    if isinstance(body, CompletionRequest):
        if body.suffix:
            found.append("suffix")
        if body.best_of not in (None, body.n):
            found.append("best_of")
    return found
