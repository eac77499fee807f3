"""POST /v1/messages (Anthropic's Messages API) and /v1/messages/count_tokens.

A request is translated into the equivalent chat request and run by the chat path, so tools,
reasoning, constraints and every check behave the same; its answer (whole, or the stream of
OpenAI chunks) is translated back into Anthropic's message and events
(message_start, content_block_start/delta/stop, message_delta, message_stop).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from soberana.server.anthropic_protocol import CountTokensRequest, MessagesRequest, to_chat_request
from soberana.server.engine_client import EngineClient
from soberana.server.engine_inputs import render_chat_off_loop
from soberana.server.errors import OpenAIError
from soberana.server.serving_chat import create_chat_completion
from soberana.server.streaming import EventStream

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                 "abort": "end_turn"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                503: "overloaded_error"}


def anthropic_error(exc: OpenAIError) -> JSONResponse:
    """An OpenAIError in Anthropic's shape: {"type": "error", "error": {"type", "message"}}."""
    return JSONResponse(
        {"type": "error", "error": {"type": _ERROR_TYPES.get(exc.status, "api_error"),
                                    "message": exc.message}},
        status_code=exc.status, headers=exc.headers,
    )


async def create_message(body: MessagesRequest, request: Request, engine: EngineClient,
                         model_name: str) -> Response:
    """Run the request through the chat path and answer in Anthropic's format."""
    chat = to_chat_request(body, stream=body.stream)
    response = await create_chat_completion(chat, request, engine, model_name)
    if body.stream:
        assert isinstance(response, EventStream)
        return EventStream(_events(response.body_iterator, model_name, body.stop_sequences))
    if not isinstance(response, JSONResponse):
        return response  # client gone
    answer = json.loads(response.body)
    return JSONResponse(_message(answer, model_name, body.stop_sequences))


async def count_tokens(body: CountTokensRequest, engine: EngineClient) -> JSONResponse:
    chat = to_chat_request(body)
    tools = [t.model_dump(exclude_none=True) for t in chat.tools] if chat.tools else None
    prompt = await render_chat_off_loop(engine, chat, tools)
    return JSONResponse({"input_tokens": len(prompt.token_ids)})


def _message(answer: dict, model: str, stops: list[str] | None) -> dict:
    choice = answer["choices"][0]
    message = choice["message"]
    content: list[dict] = []
    if message.get("reasoning_content"):
        content.append({"type": "thinking", "thinking": message["reasoning_content"],
                        "signature": ""})
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        content.append({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                        "input": _tool_input(call["function"]["arguments"])})
    stop_reason, stop_sequence = _stop(choice, stops)
    return {
        "id": "msg_" + answer["id"].removeprefix("chatcmpl-"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": {"input_tokens": answer["usage"]["prompt_tokens"],
                  "output_tokens": answer["usage"]["completion_tokens"]},
    }


def _tool_input(arguments: str) -> dict:
    """A call's input; a call cut short by max_tokens (stop_reason max_tokens) has arguments
    that are not yet JSON: its input is then empty, as far as it can be told apart."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _stop(choice: dict, stops: list[str] | None) -> tuple[str, str | None]:
    matched = choice.get("stop_reason")
    if choice.get("finish_reason") == "stop" and isinstance(matched, str) and matched in (stops or []):
        return "stop_sequence", matched
    return _STOP_REASONS.get(choice.get("finish_reason") or "stop", "end_turn"), None


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _events(chunks: AsyncIterator[str], model: str, stops: list[str] | None
                  ) -> AsyncIterator[str]:
    """Anthropic's stream events from the chat path's SSE chunks."""
    message_id = f"msg_{uuid.uuid4().hex}"
    try:
        async for event in _translate(chunks, message_id, model, stops):
            yield event
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()  # the chat stream's own cleanup aborts the engine request


async def _translate(chunks: AsyncIterator[str], message_id: str, model: str,
                     stops: list[str] | None) -> AsyncIterator[str]:
    block = -1  # index of the open content block
    kind = None  # its type: "thinking", "text" or "tool_use"
    usage = {"input_tokens": 0, "output_tokens": 0}
    started = False
    finish: dict | None = None
    async for raw in chunks:
        for line in raw.splitlines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[len("data: "):])
            if "error" in data:
                yield _event("error", {"type": "error", "error": {
                    "type": "api_error", "message": data["error"].get("message", "")}})
                return
            if data.get("usage"):
                usage = {"input_tokens": data["usage"]["prompt_tokens"],
                         "output_tokens": data["usage"]["completion_tokens"]}
            if not started:
                started = True
                yield _event("message_start", {"type": "message_start", "message": {
                    "id": message_id, "type": "message", "role": "assistant", "model": model,
                    "content": [], "stop_reason": None, "stop_sequence": None,
                    "usage": {"input_tokens": usage["input_tokens"], "output_tokens": 0}}})
            if not data.get("choices"):
                continue
            choice = data["choices"][0]
            delta = choice.get("delta") or {}
            pieces = []
            if delta.get("reasoning_content"):
                pieces.append(("thinking", {"type": "thinking_delta",
                                            "thinking": delta["reasoning_content"]}, None))
            if delta.get("content"):
                pieces.append(("text", {"type": "text_delta", "text": delta["content"]}, None))
            for call in delta.get("tool_calls") or []:
                if call.get("id"):
                    start = {"type": "tool_use", "id": call["id"],
                             "name": call["function"]["name"], "input": {}}
                    pieces.append(("tool_use", None, start))
                if call.get("function", {}).get("arguments"):
                    pieces.append(("tool_use", {"type": "input_json_delta",
                                                "partial_json": call["function"]["arguments"]}, None))
            for piece_kind, piece, start in pieces:
                if start is not None or piece_kind != kind:
                    if block >= 0:
                        yield _event("content_block_stop", {"type": "content_block_stop", "index": block})
                    block, kind = block + 1, piece_kind
                    opening = start or ({"type": "thinking", "thinking": "", "signature": ""}
                                        if kind == "thinking" else {"type": "text", "text": ""})
                    yield _event("content_block_start", {"type": "content_block_start",
                                                         "index": block, "content_block": opening})
                if piece is not None:
                    yield _event("content_block_delta", {"type": "content_block_delta",
                                                         "index": block, "delta": piece})
            if choice.get("finish_reason"):
                finish = choice
    if block >= 0:
        yield _event("content_block_stop", {"type": "content_block_stop", "index": block})
    stop_reason, stop_sequence = _stop(finish or {}, stops)
    yield _event("message_delta", {"type": "message_delta",
                                   "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                   "usage": {"output_tokens": usage["output_tokens"]}})
    yield _event("message_stop", {"type": "message_stop"})
