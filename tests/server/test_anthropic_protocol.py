"""Anthropic Messages bodies become the equivalent chat requests (no server needed)."""

from __future__ import annotations

import json

import pytest

from soberana.server.anthropic_protocol import MessagesRequest, to_chat_request
from soberana.server.errors import OpenAIError


def _chat(body: dict, stream: bool = False):
    return to_chat_request(MessagesRequest.model_validate({"model": "m", "max_tokens": 16, **body}),
                           stream)


def test_tool_use_and_tool_result_become_tool_calls_and_tool_messages():
    chat = _chat({
        "system": [{"type": "text", "text": "Be brief."}],
        "tools": [{"name": "get_time", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": "Time?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "tu_1", "name": "get_time", "input": {"zone": "CET"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "tu_1", "content": "09:30"},
                {"type": "text", "text": "And tomorrow?"}]},
        ]})
    roles = [m.role for m in chat.messages]
    assert roles == ["system", "user", "assistant", "tool", "user"]
    assistant = chat.messages[2]
    assert assistant.content == "Checking."
    assert json.loads(assistant.tool_calls[0].function.arguments) == {"zone": "CET"}
    assert chat.messages[3].tool_call_id == "tu_1" and chat.messages[3].content == "09:30"
    assert chat.tool_choice == "required" and chat.parallel_tool_calls is False
    assert chat.tools[0].function.name == "get_time"


def test_named_tool_choice_thinking_and_sampling_fields_carry_over():
    chat = _chat({"messages": [{"role": "user", "content": "x"}], "temperature": 0.5,
                  "top_k": 5, "stop_sequences": ["END"], "thinking": {"type": "enabled",
                                                                     "budget_tokens": 64},
                  "tools": [{"name": "f", "input_schema": {"type": "object"}}],
                  "tool_choice": {"type": "tool", "name": "f"}}, stream=True)
    assert chat.tool_choice.function.name == "f" and chat.chat_template_kwargs == {"enable_thinking": True}
    assert (chat.temperature, chat.top_k, chat.stop, chat.stream) == (0.5, 5, ["END"], True)
    assert chat.stream_options.include_usage


def test_values_anthropic_allows_but_we_cannot_serve_are_400s_not_500s():
    with pytest.raises(OpenAIError) as bad:
        _chat({"messages": [{"role": "user", "content": "x"}], "top_k": 2**40})
    assert bad.value.status == 400 and bad.value.param == "top_k"
    with pytest.raises(OpenAIError) as misplaced:
        _chat({"messages": [{"role": "user", "content": [
            {"type": "tool_use", "id": "a", "name": "f", "input": {}}]}]})
    assert misplaced.value.status == 400
