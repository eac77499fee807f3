"""Structured outputs, tools and reasoning through the official OpenAI client against a real
`soberana serve` of the demo model (random weights: without the grammar its text is noise)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest

from tests.server.helpers import API_KEY, ServerProcess

TEMPLATE = Path(__file__).parent / "chat_templates" / "demo-thinking.jinja"
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
    },
    "required": ["city", "days", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_forecast", "description": "Weather forecast",
                                      "parameters": SCHEMA}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["CET", "UTC"]}},
        "required": ["zone"], "additionalProperties": False}}},
]
HI = [{"role": "user", "content": "Plan my week"}]
# Over the server's 1 s compile limit (optional properties multiply llguidance's work:
# ~3 s for 3,000 on a busy 2-core machine).
SLOW_SCHEMA = {"title": "huge-optional-object", "type": "object",
               "properties": {f"field_{i}": {"type": "string"} for i in range(5000)}}


@pytest.fixture(scope="module")
def agent_server(tmp_path_factory):
    proc = ServerProcess(
        tmp_path_factory.mktemp("agents") / "server.log",
        "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3",
        "--chat-template", str(TEMPLATE), "--structured-outputs-timeout", "1",
        "--max-num-seqs", "64",
    )
    try:
        yield proc.start()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def ai(agent_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{agent_server.url}/v1", api_key=API_KEY, max_retries=0,
                         timeout=300)


def _chat(ai, **kwargs):
    kwargs.setdefault("messages", HI)
    return ai.chat.completions.create(model="soberana-demo", **kwargs)


def test_json_schema_output_always_parses_and_validates(ai):
    answer = _chat(ai, n=40, temperature=1.0, seed=7, max_tokens=96,
                   response_format={"type": "json_schema", "json_schema": {
                       "name": "forecast", "schema": SCHEMA, "strict": True}})
    assert len(answer.choices) == 40
    for choice in answer.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    assert len({c.message.content for c in answer.choices}) > 20  # real samples, not one


def test_unconstrained_demo_model_does_not_write_json(ai):
    answer = _chat(ai, n=8, temperature=1.0, seed=7, max_tokens=32)
    valid = 0
    for choice in answer.choices:
        try:
            json.loads(choice.message.content)
            valid += 1
        except json.JSONDecodeError:
            pass
    assert valid <= 1


def test_json_object_choice_regex_and_vllm_aliases(ai):
    obj = _chat(ai, temperature=1.0, seed=1, max_tokens=48, response_format={"type": "json_object"})
    assert obj.choices[0].finish_reason in ("stop", "length")
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    else:
        assert obj.choices[0].message.content.startswith("{")
    choice = _chat(ai, n=6, temperature=1.0, seed=2, max_tokens=8,
                   extra_body={"structured_outputs": {"choice": ["yes", "no (maybe)"]}})
    assert {c.message.content for c in choice.choices} <= {"yes", "no (maybe)"}
    regex = ai.completions.create(model="soberana-demo", prompt="Code:", n=4, temperature=1.0,
                                  seed=3, max_tokens=12, extra_body={"guided_regex": r"[A-Z]{2}-\d{3}"})
    for c in regex.choices:
        assert len(c.text) == 6 and c.text[2] == "-" and c.text[3:].isdigit()
    grammar = _chat(ai, temperature=1.0, seed=4, max_tokens=16,
                    extra_body={"guided_grammar": 'start: "go " DIR\nDIR: "north" | "south"'})
    assert grammar.choices[0].message.content in ("go north", "go south")


def test_constraint_errors_are_400s_naming_the_parameter(ai):
    with pytest.raises(openai.BadRequestError) as bad:
        _chat(ai, max_tokens=8, extra_body={"guided_regex": "(unclosed"})
    assert bad.value.body["param"] == "guided_regex"
    with pytest.raises(openai.BadRequestError) as two:
        _chat(ai, max_tokens=8, response_format={"type": "json_object"},
              extra_body={"guided_choice": ["a"]})
    assert two.value.body["param"] == "guided_choice"


def test_schema_that_does_not_compile_in_time_is_a_400_and_the_server_still_serves(ai):
    fmt = {"type": "json_schema", "json_schema": {"name": "slow", "schema": SLOW_SCHEMA}}
    for _ in range(2):  # the second is refused at once: the key is remembered
        with pytest.raises(openai.BadRequestError) as slow:
            _chat(ai, max_tokens=8, response_format=fmt)
        assert "huge-optional-object" in slow.value.body["message"]
        assert "did not compile within 1 s" in slow.value.body["message"]
    ok = _chat(ai, temperature=1.0, seed=5, max_tokens=64, response_format={
        "type": "json_schema", "json_schema": {"name": "forecast", "schema": SCHEMA}})
    jsonschema.validate(json.loads(ok.choices[0].message.content), SCHEMA)


def _arguments_valid(call) -> dict:
    arguments = json.loads(call.function.arguments)
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(arguments, schema)
    return arguments


def test_tool_choice_required_and_named_always_make_valid_calls(ai):
    required = _chat(ai, n=8, temperature=1.0, seed=11, max_tokens=96, tools=TOOLS,
                     tool_choice="required", parallel_tool_calls=False)
    for choice in required.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.function.name in ("get_forecast", "get_time") and call.id.startswith("call_")
        _arguments_valid(call)
    named = _chat(ai, temperature=1.0, seed=12, max_tokens=96, tools=TOOLS,
                  tool_choice={"type": "function", "function": {"name": "get_time"}})
    [call] = named.choices[0].message.tool_calls
    assert call.function.name == "get_time" and _arguments_valid(call)["zone"] in ("CET", "UTC")


def test_tool_choice_auto_parses_the_models_syntax_and_keeps_text(ai):
    answer = _chat(ai, temperature=1.0, seed=13, max_tokens=16, tools=TOOLS)
    choice = answer.choices[0]
    # The random demo model writes no <tool_call> block: its text is the content.
    assert choice.message.tool_calls is None and choice.message.content
    assert choice.finish_reason in ("stop", "length")


def test_streamed_tool_call_deltas_reassemble_to_the_unstreamed_call(ai):
    kwargs = dict(temperature=1.0, seed=21, max_tokens=96, tools=TOOLS, tool_choice="required",
                  parallel_tool_calls=False)
    whole = _chat(ai, **kwargs).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    first_fragment_of: dict[int, dict] = {}
    for chunk in _chat(ai, stream=True, **kwargs):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": tc.id, "name": tc.function.name, "arguments": ""})
            first_fragment_of.setdefault(tc.index, tc.model_dump())
            entry["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == whole.finish_reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    for first in first_fragment_of.values():  # id and name first, arguments after
        assert first["id"] and first["function"]["name"] and first["function"]["arguments"] == ""


def test_multi_turn_with_tool_results_and_model_dump_messages(ai):
    first = _chat(ai, temperature=1.0, seed=31, max_tokens=96, tools=TOOLS,
                  tool_choice={"type": "function", "function": {"name": "get_time"}})
    message = first.choices[0].message
    history = HI + [message.model_dump(),  # refusal/audio/function_call: null, as returned
                    {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "09:30"}]
    second = _chat(ai, messages=history, max_tokens=8, tools=TOOLS, tool_choice="none",
                   verbosity="low", prompt_cache_key="k1", safety_identifier="user-1")
    assert second.choices[0].message.content is not None
    tokens = ai.post("/../tokenize", cast_to=object, body={"messages": history})
    assert tokens["count"] > 0


def test_reasoning_goes_to_reasoning_content_whole_and_streamed(ai):
    kwargs = dict(temperature=1.0, seed=41, max_tokens=12,
                  extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    whole = _chat(ai, **kwargs).choices[0]
    assert whole.message.content is None and whole.message.reasoning_content  # no </think> yet
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                        for c in _chat(ai, stream=True, **kwargs) if c.choices)
    assert reasoning == whole.message.reasoning_content
    off = _chat(ai, temperature=1.0, seed=41, max_tokens=12).choices[0]
    assert off.message.content and getattr(off.message, "reasoning_content", None) is None


# ---- Anthropic Messages API, through the official anthropic client ---------------------------

ANTHROPIC_TOOLS = [{"name": t["function"]["name"], "description": t["function"].get("description", ""),
                    "input_schema": t["function"]["parameters"]} for t in TOOLS]


@pytest.fixture(scope="module")
def claude(agent_server):
    import anthropic

    # x-api-key, as Anthropic's clients send it by default
    return anthropic.Anthropic(base_url=agent_server.url, api_key=API_KEY, max_retries=0, timeout=300)


def test_anthropic_text_message_and_count_tokens(claude):
    reply = claude.messages.create(model="soberana-demo", max_tokens=8, system="Be brief.",
                                   messages=[{"role": "user", "content": "Hello"}])
    assert reply.type == "message" and reply.role == "assistant"
    assert reply.content[0].type == "text" and reply.content[0].text
    assert reply.stop_reason in ("end_turn", "max_tokens") and reply.usage.output_tokens >= 1
    counted = claude.messages.count_tokens(model="soberana-demo", system="Be brief.",
                                           messages=[{"role": "user", "content": "Hello"}])
    assert counted.input_tokens == reply.usage.input_tokens


def test_anthropic_forced_tool_use_then_tool_result(claude):
    reply = claude.messages.create(
        model="soberana-demo", max_tokens=96, tools=ANTHROPIC_TOOLS,
        tool_choice={"type": "tool", "name": "get_time"},
        messages=[{"role": "user", "content": "What time is it?"}])
    assert reply.stop_reason == "tool_use"
    [use] = [b for b in reply.content if b.type == "tool_use"]
    assert use.name == "get_time" and use.input["zone"] in ("CET", "UTC")
    follow = claude.messages.create(
        model="soberana-demo", max_tokens=8, tools=ANTHROPIC_TOOLS,
        messages=[{"role": "user", "content": "What time is it?"},
                  {"role": "assistant", "content": reply.content},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                "content": "09:30"}]}])
    assert follow.content and follow.stop_reason in ("end_turn", "max_tokens")


def test_anthropic_stream_events_match_the_whole_message(claude):
    kwargs = dict(model="soberana-demo", max_tokens=96, tools=ANTHROPIC_TOOLS,
                  tool_choice={"type": "any", "disable_parallel_tool_use": True},
                  messages=[{"role": "user", "content": "Forecast?"}],
                  extra_body={"top_k": 1})  # the same answer twice
    whole = claude.messages.create(**kwargs)
    with claude.messages.stream(**kwargs) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "message_delta" in kinds
    assert streamed.stop_reason == whole.stop_reason == "tool_use"
    assert [(b.name, b.input) for b in streamed.content if b.type == "tool_use"] == [
        (b.name, b.input) for b in whole.content if b.type == "tool_use"]


def test_anthropic_errors_have_anthropic_shape(claude):
    import anthropic

    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="claude-nonexistent", max_tokens=8,
                               messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(model="soberana-demo", max_tokens=8, tools=ANTHROPIC_TOOLS,
                               tool_choice={"type": "tool", "name": "missing"},
                               messages=[{"role": "user", "content": "Hi"}])
    assert bad.value.body["type"] == "error" and "missing" in bad.value.body["error"]["message"]
