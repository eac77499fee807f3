"""The `tool_choice: auto` call grammar, token by token on a real tokenizer (the demo model's):
free text passes, and a call — hermes `<tool_call>` or a fenced json block that opens as a call
to a known tool, as Qwen2.5-Coder writes them — is held to that tool's schema; other fenced
blocks stay free text. The parser reads the same texts the same way."""

from __future__ import annotations

import llguidance
import pytest
import transformers

from soberana.models.loader import resolve_model_path
from soberana.server.chat_output import ChatOutputParser, ToolMode, merge_deltas
from soberana.server.tool_parsers.grammar import auto_call_grammar
from soberana.structured.compiler import build_ll_tokenizer

FLIGHTS = {"type": "object", "properties": {
    "origin": {"type": "string", "pattern": "^[A-Z]{3}$"},
    "date": {"type": "string", "format": "date"}},
    "required": ["origin", "date"], "additionalProperties": False}
TOOLS = {"search_flights": FLIGHTS, "get_time": {"type": "object", "properties": {}}}
FENCED = ('Sure.\n```json\n{\n  "name": "search_flights",\n  "arguments": {\n'
          '    "origin": "MAD",\n    "date": "2026-12-20"\n  }\n}\n```')


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(resolve_model_path("demo"))


@pytest.fixture(scope="module")
def matcher_for(tokenizer):
    ll = build_ll_tokenizer(tokenizer, len(tokenizer), [tokenizer.eos_token_id])

    def make(parallel: bool) -> llguidance.LLMatcher:
        grammar = auto_call_grammar("hermes", TOOLS, parallel, lambda text: None)
        matcher = llguidance.LLMatcher(ll, llguidance.grammar_from("lark", grammar))
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    return make


def _walk(matcher, tokenizer, text: str) -> str:
    """"end" if the grammar takes all of `text` and may stop there, "open" if it takes it
    but may not stop, else the text up to the refused token."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    for n, token in enumerate(ids):
        if not matcher.consume_token(token):
            return tokenizer.decode(ids[: n + 1])
    return "end" if matcher.is_accepting() else "open"


ACCEPTED = [
    FENCED,
    '```json\n{"name": "get_time", "arguments": {}}\n```\nDone.',
    'Example:\n```json\n{"name": "Bob", "age": 3}\n```\nand ```python\nx = 1\n```',
    '<tool_call>\n{"name": "search_flights", "arguments": {"origin": "BCN", '
    '"date": "2027-01-02"}}\n</tool_call>',
    "Plain words, no call.",
]


@pytest.mark.parametrize("text", ACCEPTED)
def test_calls_and_free_text_are_accepted(matcher_for, tokenizer, text):
    assert _walk(matcher_for(True), tokenizer, text) == "end"


@pytest.mark.parametrize("bad,refused_at", [
    (FENCED.replace('"MAD"', '"mad"'), '"mad'),  # the pattern
    (FENCED.replace('"2026-12-20"', '"tomorrow"'), '"t'),  # the date format
    (FENCED.replace('"origin": "MAD",\n    ', ""), '"date"'),  # a required property
    ('```json\n{"name": "get_time", "arguments": {}, "x": 1}', ', "x'),  # nothing after it
])
def test_a_fenced_call_is_held_to_its_schema(matcher_for, tokenizer, bad, refused_at):
    seen = _walk(matcher_for(True), tokenizer, bad)
    # Refused at the token that holds the wrong part (a token may run on a little).
    at = bad.index(refused_at)
    assert seen not in ("end", "open") and at < len(seen) <= at + len(refused_at) + 3, seen


def test_the_parser_reads_fenced_calls_and_leaves_other_blocks_as_text():
    mode = ToolMode("auto", "hermes", list(TOOLS))
    for stream in (False, True):
        parser = ChatOutputParser(mode, None, None, stream_arguments=stream)
        deltas = []
        for c in FENCED + "\n" + ACCEPTED[2]:  # one character at a time
            deltas += parser.feed(c)
        rest, finish = parser.finish("stop")
        message = merge_deltas(deltas + rest)
        assert finish == "tool_calls"
        assert message["content"] == "Sure.\n\n" + ACCEPTED[2]
        [call] = message["tool_calls"]
        assert call["function"]["name"] == "search_flights"
        assert call["function"]["arguments"] == (
            '{\n    "origin": "MAD",\n    "date": "2026-12-20"\n  }')


def test_a_fenced_call_streams_per_token_and_a_cut_one_keeps_its_arguments():
    mode = ToolMode("auto", "hermes", list(TOOLS))
    parser = ChatOutputParser(mode, None, None, stream_arguments=True)
    deltas = []
    for c in FENCED:
        deltas += parser.feed(c)
    fragments = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert fragments[0]["function"]["name"] == "search_flights" and len(fragments) > 20
    cut = FENCED[: FENCED.index("2026-12")]  # max_tokens ends it inside the date
    message, finish = ChatOutputParser(mode, None, None, stream_arguments=True).message(
        cut, "length")
    assert finish == "length" and message["content"] == "Sure.\n"
    assert message["tool_calls"][0]["function"]["arguments"] == (
        '{\n    "origin": "MAD",\n    "date": "')
