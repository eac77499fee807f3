"""What every tool-call parser shares: the parsed call, segments, and held-back markers."""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field

from soberana.server.tool_parsers.call_scan import raw_arguments

_ALNUM = string.ascii_letters + string.digits


@dataclass
class ParsedCall:
    """One call: the function's name and its arguments as JSON text (an object)."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{secrets.token_hex(12)}")


Segment = str | ParsedCall


class ToolParser:
    """Finds a model's tool calls in its text. Subclasses set `markers` (texts that begin a
    call) and implement `split`."""

    name = ""
    markers: tuple[str, ...] = ()
    # Calls written in special tokens need them kept in the decoded text.
    needs_special_tokens = False
    # How a block of calls is laid out (call_scan's layouts), for streaming arguments; None:
    # the syntax is not JSON objects, and calls go out whole.
    layout: str | None = None
    arguments_key = "arguments"  # the key that holds a call's arguments in this syntax

    def __init__(self, tool_names: list[str] | None = None) -> None:
        self.tool_names = set(tool_names) if tool_names else None

    def split(self, text: str, final: bool, at_start: bool) -> tuple[list[Segment], int]:
        """Decided segments of `text` and the number of characters they cover."""
        raise NotImplementedError

    def open_block(self, pending: str, at_start: bool) -> int | None:
        """Where the calls of a block that `split` has not yet consumed begin in `pending`
        (the text after its marker), or None if no call block is open there."""
        return None

    def with_raw_arguments(self, calls: list[ParsedCall], block: str, key: str
                           ) -> list[ParsedCall]:
        """`calls` parsed from `block`, with their arguments as the model wrote them (when
        the block has the usual shape), so streamed fragments add up to the same text."""
        assert self.layout is not None
        raws = raw_arguments(block, key, self.layout, [c.name for c in calls])
        if raws is not None:
            for call, raw in zip(calls, raws, strict=True):
                call.arguments = raw
        return calls

    def new_id(self) -> str:
        return f"call_{secrets.token_hex(12)}"

    def make_call(self, name: object, arguments: object) -> ParsedCall | None:
        """A call from a parsed name and arguments (a dict or JSON text), or None when it is
        not a well-formed call to a known function (it then stays text)."""
        if not isinstance(name, str) or not name:
            return None
        if self.tool_names is not None and name not in self.tool_names:
            return None
        if arguments is None:
            arguments = {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        return ParsedCall(name, json.dumps(arguments, ensure_ascii=False), self.new_id())


def held_prefix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that could be the start of a marker."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


def json_values(text: str) -> list[object] | None:
    """The JSON values written one after another in `text` (separated by whitespace or `;`),
    or None if anything else is there."""
    decoder = json.JSONDecoder()
    values, i = [], 0
    while True:
        while i < len(text) and (text[i].isspace() or text[i] == ";"):
            i += 1
        if i == len(text):
            return values
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        values.append(value)
