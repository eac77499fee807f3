"""Request bodies of Anthropic's Messages API (POST /v1/messages), validated strictly, and
their translation into the chat request the rest of the server runs."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError

from soberana.server.errors import bad_request
from soberana.server.protocol import (
    MAX_SALT_CHARS,
    MAX_STOP,
    ChatCompletionRequest,
    RequestBody,
    StopStr,
    StrictModel,
)


class TextBlock(StrictModel):
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None
    citations: list[Any] | None = None


class ToolUseBlock(StrictModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None


class ToolResultBlock(StrictModel):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None
    cache_control: dict[str, Any] | None = None


class ThinkingBlock(StrictModel):
    type: Literal["thinking", "redacted_thinking"]
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock,
                  Field(discriminator="type")]


class Message(StrictModel):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(StrictModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None


class ToolChoice(StrictModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(StrictModel):
    type: Literal["enabled", "disabled"]
    budget_tokens: int | None = Field(None, ge=1)


class MessagesRequest(RequestBody):
    """Body of POST /v1/messages."""

    model: str
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: int = Field(ge=1, le=2**31 - 1)
    system: str | list[TextBlock] | None = None
    stop_sequences: Annotated[list[StopStr], Field(max_length=MAX_STOP)] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    metadata: dict[str, Any] | None = None
    thinking: Thinking | None = None
    service_tier: str | None = None
    # Soberana's (and vLLM's) prefix-cache partition, as on chat completions: a gateway in
    # front sets its tenant's salt here.
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_SALT_CHARS)


class CountTokensRequest(RequestBody):
    """Body of POST /v1/messages/count_tokens."""

    model: str
    messages: Annotated[list[Message], Field(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None


def to_chat_request(body: MessagesRequest | CountTokensRequest, stream: bool = False
                    ) -> ChatCompletionRequest:
    """The same conversation as an OpenAI chat request (tool_use → tool_calls, tool_result →
    tool messages); a 400 names what has no counterpart."""
    messages: list[dict] = []
    if body.system:
        messages.append({"role": "system", "content": _text(body.system)})
    for i, message in enumerate(body.messages):
        messages += _chat_messages(message, i)
    chat: dict[str, Any] = {"model": body.model, "messages": messages}
    if body.tools:
        chat["tools"] = [{"type": "function", "function": {
            "name": t.name, "parameters": t.input_schema,
            **({"description": t.description} if t.description else {})}} for t in body.tools]
    choice = body.tool_choice
    if choice is not None:
        if choice.type == "tool":
            if not choice.name:
                raise bad_request("tool_choice of type tool needs a name", "tool_choice.name")
            chat["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            chat["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
        if choice.disable_parallel_tool_use:
            chat["parallel_tool_calls"] = False
    if body.thinking is not None:
        chat["chat_template_kwargs"] = {"enable_thinking": body.thinking.type == "enabled"}
    if isinstance(body, MessagesRequest):
        chat.update(max_tokens=body.max_tokens, stream=stream)
        if stream:
            chat["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        for name in ("temperature", "top_p"):
            if getattr(body, name) is not None:
                chat[name] = getattr(body, name)
        if body.top_k:
            chat["top_k"] = body.top_k
        if body.stop_sequences:
            chat["stop"] = body.stop_sequences
        if body.metadata and isinstance(body.metadata.get("user_id"), str):
            chat["user"] = body.metadata["user_id"]
        if body.cache_salt is not None:
            chat["cache_salt"] = body.cache_salt
    try:
        return ChatCompletionRequest.model_validate(chat)
    except ValidationError as exc:  # a value in Anthropic's range but not in ours
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise bad_request(f"{where}: {error['msg']}", where) from exc


def _text(content: str | list[TextBlock]) -> str:
    return content if isinstance(content, str) else "".join(b.text for b in content)


def _chat_messages(message: Message, index: int) -> list[dict]:
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    out: list[dict] = []
    text: list[str] = []
    calls: list[dict] = []
    for block in message.content:
        if isinstance(block, TextBlock):
            text.append(block.text)
        elif isinstance(block, ToolUseBlock):
            if message.role != "assistant":
                raise bad_request("tool_use blocks belong in assistant messages",
                                  f"messages.{index}.content")
            calls.append({"id": block.id, "type": "function", "function": {
                "name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)}})
        elif isinstance(block, ToolResultBlock):
            if message.role != "user":
                raise bad_request("tool_result blocks belong in user messages",
                                  f"messages.{index}.content")
            result = _text(block.content) if block.content is not None else ""
            if block.is_error:
                result = f"Error: {result}"
            out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": result})
        # thinking blocks of earlier turns are not shown to the model again (as templates do)
    if text or calls or not out:
        entry: dict = {"role": message.role, "content": "".join(text)}
        if calls:
            entry["tool_calls"] = calls
        out.append(entry)
    return out
