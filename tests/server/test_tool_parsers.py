"""Tool-call and reasoning parsers on real chat templates: the call a template renders is the
call the parser finds, whole or streamed with the text split at every character."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from soberana.server.chat_output import ChatOutputParser, ToolMode, merge_deltas
from soberana.server.engine_inputs import render_chat
from soberana.server.protocol import ChatCompletionRequest
from soberana.server.tool_parsers import detect_tool_parser

TEMPLATES = Path(__file__).parent / "chat_templates"
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Local time in a zone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}},
]
CALL = {"id": "abcDEF123", "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": "Zürich", "unit": "c"})}}

# template file, the parser auto-detection must pick, and the end of the assistant's turn
CASES = {
    "qwen2.5": ("Qwen-Qwen2.5-7B-Instruct.jinja", "hermes", "<|im_end|>"),
    "qwen3": ("Qwen-Qwen3-0.6B.jinja", "hermes", "<|im_end|>"),
    "llama3.1": ("meta-llama-Llama-3.1-8B-Instruct.jinja", "llama3_json", "<|eot_id|>"),
    "mistral": ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "mistral", "</s>"),
}


class _TemplateTokenizer:
    """The chat-template half of a tokenizer: renders with transformers' own Jinja setup."""

    def __init__(self, template: str) -> None:
        from soberana.models.demo import demo_model_path
        from soberana.models.tokenizer import load_tokenizer

        self.inner = load_tokenizer(demo_model_path())
        self.inner.chat_template = template
        self.chat_template = template

    def apply_chat_template(self, *args, **kwargs):
        return self.inner.apply_chat_template(*args, **kwargs)

    def encode(self, text, add_special_tokens=False):
        return self.inner.encode(text, add_special_tokens=add_special_tokens)


def _render(case: str, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
    body = ChatCompletionRequest.model_validate({"messages": messages, "tools": TOOLS})
    template = (TEMPLATES / CASES[case][0]).read_text()
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    return render_chat(_TemplateTokenizer(template), body.messages, add_generation_prompt, False,
                       kwargs or None, tools).text


def _assistant_call_text(case: str) -> str:
    """How the model writes CALL, as its own chat template renders it in the history."""
    user = {"role": "user", "content": "Weather in Zürich?"}
    before = _render(case, [user])
    after = _render(case, [user, {"role": "assistant", "content": "", "tool_calls": [CALL]}])
    assert after.startswith(before[: len(before) - 20])
    turn = after[len(before):]
    for header in ("<|im_start|>assistant\n", "<|start_header_id|>assistant<|end_header_id|>\n\n"):
        turn = turn.split(header, 1)[-1]
    return turn.split(CASES[case][2])[0]


def _parse_every_split(text: str, mode: ToolMode, reasoning: str | None = None,
                       prompt: str | None = None, finish: str = "stop",
                       stream: bool = False) -> tuple[dict, str]:
    """The message of `text` whole, asserting the same message for every 2-way split and a
    sliding 3-way split (ids aside: each call gets a fresh one). `stream`: arguments stream
    as they are written (the call grammar's mode)."""
    whole, reason = ChatOutputParser(mode, reasoning, prompt, stream).message(text, finish)

    def no_ids(message: dict) -> dict:
        return {**message, "tool_calls": [{**c, "id": None} for c in message.get("tool_calls", [])]}

    for cut in range(len(text) + 1):
        for end in (cut, min(len(text), cut + 2)):
            parser = ChatOutputParser(mode, reasoning, prompt, stream)
            deltas = parser.feed(text[:cut]) + parser.feed(text[cut:end]) + parser.feed(text[end:])
            rest, split_reason = parser.finish(finish)
            assert (no_ids(merge_deltas(deltas + rest)), split_reason) == (no_ids(whole), reason), cut
    return whole, reason


@pytest.mark.parametrize("case", sorted(CASES))
def test_parser_is_detected_from_the_real_chat_template(case):
    assert detect_tool_parser((TEMPLATES / CASES[case][0]).read_text()) == CASES[case][1]


@pytest.mark.parametrize("case", sorted(CASES))
def test_call_rendered_by_the_template_is_parsed_back_at_every_split(case):
    text = _assistant_call_text(case)
    assert "get_weather" in text and "Zürich" in text
    mode = ToolMode("auto", CASES[case][1], ["get_weather", "get_time"])
    # Qwen3's template writes an (empty) thinking block before the call.
    message, finish = _parse_every_split(text, mode, "qwen3" if case == "qwen3" else None)
    assert finish == "tool_calls"
    [call] = message["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Zürich", "unit": "c"}
    assert not (message["content"] or "").strip()


@pytest.mark.parametrize("case", ["qwen2.5", "qwen3"])
def test_history_with_calls_and_results_renders_through_the_template(case):
    text = _render(case, [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL], "refusal": None,
         "audio": None, "function_call": None},
        {"role": "tool", "tool_call_id": CALL["id"], "content": "18 degrees, sunny"},
    ])
    assert '"name": "get_weather"' in text and "<tool_response>\n18 degrees, sunny" in text
    assert '"description": "Current weather in a city"' in text  # tools= reached the template


def test_hermes_text_and_parallel_calls_split_anywhere():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
            '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n'
            "</tool_call>")
    message, finish = _parse_every_split(text, ToolMode("auto", "hermes", ["get_weather", "get_time"]))
    assert message["content"] == "Let me check.\n" and finish == "tool_calls"
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather", "get_time"]
    one, _ = ChatOutputParser(ToolMode("auto", "hermes", ["get_weather", "get_time"], parallel=False),
                              None, None).message(text, "stop")
    assert len(one["tool_calls"]) == 1


def test_call_cut_by_max_tokens_is_never_a_malformed_call():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Os'
    message, finish = _parse_every_split(text, ToolMode("auto", "hermes", ["get_weather"]),
                                         finish="length")
    assert finish == "length" and "tool_calls" not in message
    assert message["content"] == text  # nothing lost either


def test_unknown_function_or_bad_json_stays_text():
    text = '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call> and <tool_call>{oops</tool_call>'
    message, finish = _parse_every_split(text, ToolMode("auto", "hermes", ["get_weather"]))
    assert "tool_calls" not in message and finish == "stop" and message["content"] == text


def test_qwen3_reasoning_then_call_split_anywhere():
    prompt = _render("qwen3", [{"role": "user", "content": "Weather in Oslo?"}],
                     add_generation_prompt=True)
    text = ('<think>\nThe user wants <tool_call> weather.\n</think>\n\n<tool_call>\n'
            '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    message, finish = _parse_every_split(text, ToolMode("auto", "hermes", ["get_weather"]), "qwen3", prompt)
    assert message["reasoning_content"] == "\nThe user wants <tool_call> weather.\n"
    assert finish == "tool_calls" and message["content"] is None
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"city": "Oslo"}


def test_qwen3_with_thinking_disabled_is_all_content():
    prompt = _render("qwen3", [{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                     enable_thinking=False)
    assert prompt.rstrip().endswith("</think>")
    message, _ = _parse_every_split("Hello <think>there", None, "qwen3", prompt)
    assert message == {"role": "assistant", "content": "Hello <think>there"}


def test_call_inside_an_unclosed_thinking_block_is_still_made():
    text = 'I will call it. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    message, finish = _parse_every_split(text, ToolMode("auto", "hermes", ["get_weather"]), "deepseek_r1")
    assert finish == "tool_calls" and message["reasoning_content"] == text
    assert message["tool_calls"][0]["function"]["name"] == "get_weather"


def test_deepseek_r1_reasoning_split_anywhere():
    message, finish = _parse_every_split("step 1, step 2</think>\n\nThe answer is 4.", None, "deepseek_r1")
    assert message == {"role": "assistant", "reasoning_content": "step 1, step 2",
                       "content": "The answer is 4."}


@pytest.mark.parametrize(("parser", "text"), [
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Lima"}}; '
                    '{"name": "get_time", "parameters": {"zone": "PET"}}'),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Lima"}}'),
    ("pythonic", '[get_weather(city="Lima", unit="c"), get_time(zone="PET")]'),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Lima"}}]'),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Lima"}'),
])
def test_other_formats_split_anywhere(parser, text):
    message, finish = _parse_every_split(text, ToolMode("auto", parser, ["get_weather", "get_time"]))
    assert finish == "tool_calls" and message["tool_calls"][0]["function"]["name"] == "get_weather"
    assert json.loads(message["tool_calls"][0]["function"]["arguments"])["city"] == "Lima"


def test_whole_answer_formats_leave_plain_text_alone():
    for parser in ("llama3_json", "pythonic"):
        message, finish = _parse_every_split("The [weather] {is} fine.", ToolMode("auto", parser, ["f"]))
        assert message["content"] == "The [weather] {is} fine." and finish == "stop"
