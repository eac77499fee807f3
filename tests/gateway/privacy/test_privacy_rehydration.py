"""Rehydration: whole answers, and SSE streams cut at every byte boundary."""

from __future__ import annotations

import json

from soberana.gateway.privacy.rehydrator import Rehydrator, SseRehydrator
from tests.fake_openai import Behaviour, Echo

VALUES = {"<IBAN_CODE_1>": "ES91 2100 0418 4502 0005 1332", "<PERSON_1>": 'Ana "la jefa" Ruiz'}


def openai_text(stream: bytes) -> tuple[str, str]:
    """(content, tool-call arguments) a client assembles from an OpenAI SSE stream."""
    content, args = "", ""
    for event in stream.decode().split("\n\n"):
        if not event.startswith("data: ") or event == "data: [DONE]":
            continue
        for choice in json.loads(event[6:]).get("choices", []):
            delta = choice.get("delta", {})
            content += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                args += call.get("function", {}).get("arguments", "")
    return content, args


def anthropic_text(stream: bytes) -> tuple[str, str]:
    text, partial = "", ""
    for event in stream.decode().split("\n\n"):
        data = [line[6:] for line in event.splitlines() if line.startswith("data: ")]
        if not data:
            continue
        obj = json.loads(data[0])
        if obj.get("type") == "content_block_delta":
            text += obj["delta"].get("text", "")
            partial += obj["delta"].get("partial_json", "")
    return text, partial


def cuts(stream: bytes) -> list[int]:
    """Every byte position of the first 2,000 bytes (content deltas, every placeholder split
    every way), then every 7th (tool-call deltas), to keep the test quick."""
    return [*range(1, min(2000, len(stream))), *range(2000, len(stream), 7)]


def upstream_stream(anthropic: bool, piece_chars: int) -> tuple[bytes, str, str]:
    echo = Echo(Behaviour(piece_chars=piece_chars, extra_text=" <PERSON_9> <IBAN_CODE_"))
    text, args = echo.answer(json.dumps(list(VALUES)).encode())
    events = echo.anthropic_events(text, args) if anthropic else echo.openai_events(text, args, {})
    return b"".join(events), text, args


def expected(text: str, args: str) -> tuple[str, str]:
    r = Rehydrator(VALUES)
    return r.text(text), r.text(args, escape=True)


def test_openai_stream_split_at_every_byte_gives_the_originals():
    # 7-character deltas put the delta boundary at a different place in each placeholder;
    # the extra cut then falls at every byte of the stream (inside events too).
    stream, text, args = upstream_stream(anthropic=False, piece_chars=7)
    want = expected(text, args)
    assert want[0].count(VALUES["<IBAN_CODE_1>"]) == 1
    assert json.loads(want[1])["values"][1] == VALUES["<PERSON_1>"]  # quotes escaped in JSON
    for cut in cuts(stream):
        s = SseRehydrator(Rehydrator(VALUES))
        out = s.feed(stream[:cut]) + s.feed(stream[cut:]) + s.flush()
        assert openai_text(out) == want, cut


def test_openai_stream_of_one_character_deltas_in_single_byte_chunks():
    # Every placeholder is split between every pair of its characters.
    stream, text, args = upstream_stream(anthropic=False, piece_chars=1)
    s = SseRehydrator(Rehydrator(VALUES))
    out = b"".join(s.feed(stream[i : i + 1]) for i in range(len(stream))) + s.flush()
    assert openai_text(out) == expected(text, args)


def test_anthropic_stream_split_at_every_byte_gives_the_originals():
    stream, text, args = upstream_stream(anthropic=True, piece_chars=7)
    want = expected(text, args)
    for cut in cuts(stream):
        s = SseRehydrator(Rehydrator(VALUES))
        out = s.feed(stream[:cut]) + s.feed(stream[cut:]) + s.flush()
        assert anthropic_text(out) == want, cut


def test_anthropic_stream_of_one_character_deltas_in_single_byte_chunks():
    stream, text, args = upstream_stream(anthropic=True, piece_chars=1)
    s = SseRehydrator(Rehydrator(VALUES))
    out = b"".join(s.feed(stream[i : i + 1]) for i in range(len(stream))) + s.flush()
    assert anthropic_text(out) == expected(text, args)


def test_invented_and_truncated_placeholders_are_left_as_they_are():
    stream, _, _ = upstream_stream(anthropic=False, piece_chars=1)
    s = SseRehydrator(Rehydrator(VALUES))
    content, _ = openai_text(s.feed(stream) + s.flush())
    assert content.endswith(" <PERSON_9> <IBAN_CODE_")  # unknown number, and a cut-off one


def test_only_a_possible_placeholder_prefix_is_held_back():
    r = Rehydrator(VALUES)
    assert r.split_tail("hola <IBA") == ("hola ", "<IBA")
    assert r.split_tail("hola <IBX") == ("hola <IBX", "")
    assert r.split_tail("a < b") == ("a < b", "")
    assert r.split_tail("x <PERSON_1") == ("x ", "<PERSON_1")
    assert r.split_tail("x <PERSON_1>") == ("x <PERSON_1>", "")


def test_whole_answer_is_rehydrated_in_content_and_tool_arguments():
    r = Rehydrator(VALUES)
    body = {
        "choices": [
            {
                "message": {
                    "content": "IBAN <IBAN_CODE_1>, <PERSON_2>",
                    "tool_calls": [
                        {"function": {"name": "f", "arguments": json.dumps({"who": "<PERSON_1>"})}}
                    ],
                }
            }
        ]
    }
    out = json.loads(r.body(json.dumps(body).encode()))
    message = out["choices"][0]["message"]
    assert message["content"] == "IBAN ES91 2100 0418 4502 0005 1332, <PERSON_2>"
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {
        "who": VALUES["<PERSON_1>"]
    }
