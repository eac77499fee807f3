"""Tool-call arguments streamed as they are written (the call grammar's mode): id and name
first, then argument fragments; the fragments add up to the unstreamed call at every split,
a call cut by max_tokens keeps the arguments written so far (finish_reason "length"), and a
call inside a thinking block is still made."""

from __future__ import annotations

import json

import pytest

from soberana.server.chat_output import ChatOutputParser, ToolMode, merge_deltas
from tests.server.test_tool_parsers import CASES, _assistant_call_text, _parse_every_split, _render

NAMES = ["get_weather", "get_time"]
HERMES = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
          '{"city": "Zürich \\"Z\\" {x}", "days": [1, 2]}}\n</tool_call>\n<tool_call>\n'
          '{"name": "get_time", "arguments": {}}\n</tool_call>')


def _per_character(parser: ChatOutputParser, text: str, finish: str = "stop"
                   ) -> tuple[list[dict], str | None]:
    deltas: list[dict] = []
    for c in text:
        deltas += parser.feed(c)
    rest, reason = parser.finish(finish)
    return deltas + rest, reason


def _fragments(deltas: list[dict]) -> dict[int, list[dict]]:
    """Each call's tool_calls entries in order of arrival."""
    calls: dict[int, list[dict]] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            calls.setdefault(tc["index"], []).append(tc)
    return calls


def _assert_openai_order(deltas: list[dict]) -> dict[int, list[dict]]:
    calls = _fragments(deltas)
    for entries in calls.values():
        first, rest = entries[0], entries[1:]
        assert first["id"] and first["function"]["name"] and first["function"]["arguments"] == ""
        assert all("id" not in e and "name" not in e["function"] for e in rest)
    return calls


def test_hermes_arguments_stream_per_character_and_add_up_at_every_split():
    mode = ToolMode("auto", "hermes", NAMES)
    whole, finish = _parse_every_split(HERMES, mode, stream=True)
    assert finish == "tool_calls" and whole["content"] == "Let me check.\n"
    assert [json.loads(c["function"]["arguments"]) for c in whole["tool_calls"]] == [
        {"city": 'Zürich "Z" {x}', "days": [1, 2]}, {}]
    deltas, _ = _per_character(ChatOutputParser(mode, None, None, True), HERMES)
    calls = _assert_openai_order(deltas)
    weather = calls[0]
    assert len(weather) > 20  # one fragment per character written, not one per call
    assert "".join(e["function"]["arguments"] for e in weather) == (
        whole["tool_calls"][0]["function"]["arguments"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_template_calls_stream_and_add_up_on_real_templates(case):
    text = _assistant_call_text(case)
    mode = ToolMode("auto", CASES[case][1], NAMES)
    reasoning = "qwen3" if case == "qwen3" else None
    message, finish = _parse_every_split(text, mode, reasoning, stream=True)
    assert finish == "tool_calls"
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"city": "Zürich",
                                                                             "unit": "c"}
    deltas, _ = _per_character(ChatOutputParser(mode, reasoning, None, True), text)
    assert len(_assert_openai_order(deltas)[0]) > 5


@pytest.mark.parametrize(("parser", "text"), [
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Lima"}}; '
                    '{"name": "get_time", "parameters": {"zone": "PET"}}'),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Lima"}}, '
                '{"name": "get_time", "arguments": {"zone": "PET"}}]'),
])
def test_whole_answer_and_array_formats_stream_several_calls(parser, text):
    mode = ToolMode("auto", parser, NAMES)
    message, finish = _parse_every_split(text, mode, stream=True)
    assert finish == "tool_calls"
    assert [c["function"]["name"] for c in message["tool_calls"]] == NAMES
    deltas, _ = _per_character(ChatOutputParser(mode, None, None, True), text)
    calls = _assert_openai_order(deltas)
    assert len(calls[0]) > 5 and len(calls[1]) > 5


def test_every_cut_of_a_call_is_a_prefix_of_it_or_text_never_a_different_call():
    mode = ToolMode("auto", "hermes", NAMES)
    full, _ = ChatOutputParser(mode, None, None, True).message(HERMES, "stop")
    full_args = [c["function"]["arguments"] for c in full["tool_calls"]]
    announced_cut = 0
    for n in range(len(HERMES) + 1):
        text = HERMES[:n]
        message, finish = _parse_every_split(text, mode, finish="length", stream=True) if (
            n % 7 == 0) else ChatOutputParser(mode, None, None, True).message(text, "length")
        assert finish == "length"
        for i, call in enumerate(message.get("tool_calls", [])):
            assert full_args[i].startswith(call["function"]["arguments"]), n
            announced_cut += call["function"]["arguments"] != full_args[i]
        # Nothing lost: what is not a call is content.
        assert "get_weather" in (message["content"] or "") or message.get("tool_calls") or (
            "get_weather" not in text)
    assert announced_cut > 30  # cuts inside the arguments are calls with partial arguments


def test_required_and_named_calls_stream_per_character():
    required = ToolMode("required", None, NAMES)
    text = '[{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "get_time", "parameters": {}}]'
    message, finish = _parse_every_split(text, required)
    assert finish == "tool_calls" and [c["function"]["arguments"] for c in message["tool_calls"]] == [
        '{"city": "Oslo"}', "{}"]
    deltas, _ = _per_character(ChatOutputParser(required, None, None), text)
    assert len(_assert_openai_order(deltas)[0]) > 10
    named = ToolMode("named", None, NAMES, function="get_time")
    message, finish = _parse_every_split('{"zone": "CET"}', named)
    assert finish == "tool_calls" and message["tool_calls"][0]["function"]["name"] == "get_time"
    cut, reason = ChatOutputParser(named, None, None).message('{"zone": "C', "length")
    assert reason == "length" and cut["tool_calls"][0]["function"]["arguments"] == '{"zone": "C'


def test_call_inside_a_thinking_block_streams_and_is_made():
    prompt = _render("qwen3", [{"role": "user", "content": "Weather in Oslo?"}],
                     add_generation_prompt=True, enable_thinking=True)
    text = ('<think>\nI should call <tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Oslo"}}\n</tool_call>')
    mode = ToolMode("auto", "hermes", NAMES)
    message, finish = _parse_every_split(text, mode, "qwen3", prompt, stream=True)
    assert finish == "tool_calls" and "get_weather" in message["reasoning_content"]
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"city": "Oslo"}
    closed = text + "\n</think>\n\nDone."
    message, finish = _parse_every_split(closed, mode, "qwen3", prompt, stream=True)
    assert finish == "stop" and message["content"] == "Done." and "tool_calls" not in message


def test_streamed_deltas_merge_to_the_same_message():
    mode = ToolMode("auto", "hermes", NAMES)
    deltas, reason = _per_character(ChatOutputParser(mode, None, None, True), HERMES)
    whole, whole_reason = ChatOutputParser(mode, None, None, True).message(HERMES, "stop")
    merged = merge_deltas(deltas)
    assert reason == whole_reason == "tool_calls"
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in merged["tool_calls"]] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in whole["tool_calls"]]
