"""`tool_choice: auto` through the official clients against a real `soberana serve` of a tiny
random model that starts hermes calls by itself (tests/server/tool_prone_model.py): once a
call starts, the call grammar holds it to the tool's schema, so every call the model makes at
temperature 1 is valid; its arguments stream token by token (OpenAI `delta.tool_calls`,
Anthropic `input_json_delta`) and add up to the unstreamed call."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from soberana.server.tool_parsers import TOOL_PARSERS
from tests.server.helpers import API_KEY, ServerProcess
from tests.server.test_agents_api import TEMPLATE, TOOLS
from tests.server.tool_prone_model import build_tool_prone_model

HI = [{"role": "user", "content": "Plan my week"}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    model = build_tool_prone_model(tmp_path_factory.mktemp("tool-prone-model"))
    proc = ServerProcess(
        tmp_path_factory.mktemp("auto-tools") / "server.log",
        "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3",
        "--chat-template", str(TEMPLATE), "--max-num-seqs", "64", "--served-model-name", "tp",
        model=str(model),
    )
    try:
        yield proc.start()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def ai(tool_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tool_server.url}/v1", api_key=API_KEY, max_retries=0,
                         timeout=300)


def _chat(ai, **kwargs):
    kwargs.setdefault("messages", HI)
    return ai.chat.completions.create(model="tp", **kwargs)


def _check_calls(choice) -> tuple[int, int]:
    """(valid calls, calls cut by max_tokens) of one choice; anything else fails."""
    calls = choice.message.tool_calls or []
    valid = cut = 0
    for i, call in enumerate(calls):
        try:
            arguments = json.loads(call.function.arguments)
        except json.JSONDecodeError:
            # Only the last call of an answer that max_tokens cut may be unfinished.
            assert choice.finish_reason == "length" and i == len(calls) - 1, call
            cut += 1
            continue
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        valid += 1
    return valid, cut


def test_every_auto_call_at_temperature_1_parses_and_validates(ai):
    valid = cut = 0
    for seed in (1,):
        answer = _chat(ai, n=24, temperature=1.0, seed=seed, max_tokens=64, tools=TOOLS)
        for choice in answer.choices:
            v, c = _check_calls(choice)
            valid, cut = valid + v, cut + c
            if choice.message.tool_calls and choice.finish_reason != "length":
                assert choice.finish_reason == "tool_calls"
    assert valid >= 12, (valid, cut)  # the model does call: the test is not vacuous


def test_the_same_model_without_the_call_grammar_writes_broken_calls(ai):
    # tool_choice none: no grammar, no parser; the calls the model starts are left as text.
    answer = _chat(ai, n=12, temperature=1.0, seed=1, max_tokens=64, tools=TOOLS,
                   tool_choice="none")
    parser = TOOL_PARSERS["hermes"](list(SCHEMAS))
    started = parsed = 0
    for choice in answer.choices:
        text = choice.message.content or ""
        started += text.count("<tool_call>")
        segments, _ = parser.split(text, True, True)
        parsed += sum(not isinstance(s, str) for s in segments)
    assert started >= 12 and parsed <= 1


def _stream_message(ai, **kwargs) -> tuple[dict, str | None, dict[int, int]]:
    """The message a stream adds up to, its finish reason, and fragments per call."""
    calls: dict[int, dict] = {}
    fragments: dict[int, int] = {}
    content, finish = "", None
    for chunk in _chat(ai, stream=True, **kwargs):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            if tc.index not in calls:  # id and name come first, with empty arguments
                assert tc.id and tc.function.name and tc.function.arguments == ""
                calls[tc.index] = {"name": tc.function.name, "arguments": ""}
                fragments[tc.index] = 0
            else:
                assert tc.id is None and tc.function.name is None
                calls[tc.index]["arguments"] += tc.function.arguments or ""
                fragments[tc.index] += 1
        finish = chunk.choices[0].finish_reason or finish
    return {"content": content, "calls": [calls[i] for i in sorted(calls)]}, finish, fragments


def test_streamed_arguments_arrive_per_token_and_add_up_to_the_unstreamed_call(ai):
    seen_cut = seen_whole = pieces = calls = 0
    for seed in (1, 2):  # each: one whole call, then one that max_tokens cuts
        kwargs = dict(temperature=1.0, seed=seed, max_tokens=64, tools=TOOLS)
        whole = _chat(ai, **kwargs).choices[0]
        streamed, finish, fragments = _stream_message(ai, **kwargs)
        assert finish == whole.finish_reason
        assert streamed["content"] == (whole.message.content or "")
        assert streamed["calls"] == [{"name": c.function.name, "arguments": c.function.arguments}
                                     for c in whole.message.tool_calls or []]
        for i, call in enumerate(streamed["calls"]):
            assert fragments[i] >= 1
            pieces, calls = pieces + fragments[i], calls + 1
            try:
                json.loads(call["arguments"])
                seen_whole += 1
            except json.JSONDecodeError:
                seen_cut += 1  # a call cut by max_tokens: the arguments written so far
                assert finish == "length" and i == len(streamed["calls"]) - 1
    assert seen_whole >= 2 and seen_cut >= 1, (seen_whole, seen_cut)
    # Token by token, not one piece per call. A stream sends what the engine produced since
    # its last write, so a handler that lags (a loaded host) may get several tokens of one
    # call at once: the bound is on all calls together (the parser's per-token deltas are
    # tested at every split point in test_tool_call_streaming.py).
    assert pieces >= 3 * calls, (pieces, calls)


def test_call_inside_a_thinking_block_is_held_to_the_schema(ai):
    thinking = {"chat_template_kwargs": {"enable_thinking": True}}
    answer = _chat(ai, n=8, temperature=1.0, seed=5, max_tokens=64, tools=TOOLS,
                   extra_body=thinking)
    made = 0
    for choice in answer.choices:
        # The block never closes (</think> is several random tokens away): the calls written
        # in it are still made, and the grammar held them too.
        assert choice.message.content is None and choice.message.reasoning_content
        made += _check_calls(choice)[0]
    assert made >= 3


@pytest.fixture(scope="module")
def claude(tool_server):
    import anthropic

    return anthropic.Anthropic(base_url=tool_server.url, api_key=API_KEY, max_retries=0,
                               timeout=300)


def test_anthropic_auto_tool_use_streams_input_json_deltas(claude):
    tools = [{"name": n, "input_schema": s} for n, s in SCHEMAS.items()]
    kwargs = dict(model="tp", max_tokens=48, tools=tools,
                  messages=[{"role": "user", "content": "Forecast?"}],
                  extra_body={"top_k": 1})  # the same answer twice: this model always calls
    whole = claude.messages.create(**kwargs)
    deltas_per_block: dict[int, int] = {}
    with claude.messages.stream(**kwargs) as stream:
        for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                deltas_per_block[event.index] = deltas_per_block.get(event.index, 0) + 1
        streamed = stream.get_final_message()
    uses = [b for b in whole.content if b.type == "tool_use"]
    assert uses and all(u.name in SCHEMAS for u in uses)
    assert max(deltas_per_block.values()) >= 3
    finished = uses if whole.stop_reason != "max_tokens" else uses[:-1]
    for use in finished:
        jsonschema.validate(use.input, SCHEMAS[use.name])
    assert [(b.name, b.input) for b in streamed.content if b.type == "tool_use"][:len(finished)] == [
        (b.name, b.input) for b in finished]
    assert streamed.stop_reason == whole.stop_reason
