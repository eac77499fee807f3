"""Turns a choice's generated text into OpenAI message parts: reasoning, content, tool calls.

One `ChatOutputParser` per choice is fed the text as it streams; an answer that does not
stream is the same parser fed once, so both give the same calls and the same split wherever
the chunks fell. Text that might still become a tag or a call is held back, never lost: what
is left at the end is content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from soberana.server.reasoning_parsers import ReasoningSplitter
from soberana.server.tool_parsers import TOOL_PARSERS, ParsedCall, ToolParser


@dataclass
class ToolMode:
    """How this request's tools are used: `auto` (the model's syntax, parsed), `required` or
    `named` (the grammar makes the whole answer JSON: an array of calls, or the named
    function's arguments)."""

    kind: str  # "auto" | "required" | "named"
    parser: str | None = None  # for auto
    tool_names: list[str] = field(default_factory=list)
    function: str | None = None  # for named
    parallel: bool = True


class ChatOutputParser:
    """Incremental split of one choice's text into OpenAI delta dicts."""

    def __init__(self, tools: ToolMode | None, reasoning_parser: str | None,
                 prompt_text: str | None) -> None:
        self.tools = tools
        self.reasoning = (ReasoningSplitter(reasoning_parser, prompt_text)
                          if reasoning_parser else None)
        self.tool_parser: ToolParser | None = None
        if tools is not None and tools.kind == "auto" and tools.parser:
            self.tool_parser = TOOL_PARSERS[tools.parser](tools.tool_names)
        self.pending = ""  # content not yet decided by the tool parser
        self.consumed_any = False  # the tool parser has consumed content before
        self.forced_text = ""  # required/named: the whole JSON answer
        self.reasoning_text = ""  # for a call left inside an unclosed thinking block
        self.calls: list[ParsedCall] = []

    def feed(self, text: str) -> list[dict]:
        """Delta dicts for this piece of generated text."""
        return self._step(text, final=False)

    def finish(self, finish_reason: str | None) -> tuple[list[dict], str | None]:
        """The remaining deltas and the finish reason to report ("tool_calls" when calls
        were made and the model stopped by itself)."""
        deltas = self._step("", final=True)
        if self.tools is not None and self.tools.kind in ("required", "named"):
            calls = self._forced_calls()
            deltas += self._emit_calls(calls)
            if not calls and self.forced_text:  # cut short: the partial JSON, as content
                deltas.append({"content": self.forced_text})
        elif (self.reasoning is not None and not self.reasoning.ended and not self.calls
              and self.tool_parser is not None):
            # A call written inside a thinking block that never closed is still the model's
            # call (vLLM loses these); its text stays in reasoning_content too.
            segments, _ = type(self.tool_parser)(self.tools.tool_names).split(
                self.reasoning_text, True, False)
            deltas += self._emit_calls([s for s in segments if isinstance(s, ParsedCall)])
        if self.calls and finish_reason == "stop":
            finish_reason = "tool_calls"
        return deltas, finish_reason

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """The whole message of a non-streamed answer, and its finish reason."""
        deltas = self.feed(text)
        rest, finish_reason = self.finish(finish_reason)
        return merge_deltas(deltas + rest), finish_reason

    # ---- steps --------------------------------------------------------------------------

    def _step(self, text: str, final: bool) -> list[dict]:
        deltas: list[dict] = []
        content = text
        if self.reasoning is not None:
            reasoning, content = self.reasoning.feed(text, final)
            if reasoning:
                self.reasoning_text += reasoning
                deltas.append({"reasoning_content": reasoning})
        if self.tools is not None and self.tools.kind in ("required", "named"):
            self.forced_text += content
            return deltas
        if self.tool_parser is None:
            if content:
                deltas.append({"content": content})
            return deltas
        self.pending += content
        segments, used = self.tool_parser.split(self.pending, final, not self.consumed_any)
        if used:
            self.consumed_any = True
        self.pending = self.pending[used:]
        calls = []
        for segment in segments:
            if isinstance(segment, ParsedCall):
                calls.append(segment)
            elif segment and not (self.calls or calls) or segment.strip():
                deltas.append({"content": segment})
        deltas += self._emit_calls(calls)
        return deltas

    def _emit_calls(self, calls: list[ParsedCall]) -> list[dict]:
        if self.tools is not None and not self.tools.parallel:
            calls = calls[: max(0, 1 - len(self.calls))]
        deltas = []
        for call in calls:
            index = len(self.calls)
            self.calls.append(call)
            # OpenAI's shape: id, type and name first, then the arguments.
            deltas.append({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                           "function": {"name": call.name, "arguments": ""}}]})
            deltas.append({"tool_calls": [{"index": index,
                                           "function": {"arguments": call.arguments}}]})
        return deltas

    def _forced_calls(self) -> list[ParsedCall]:
        """Calls from a grammar-forced answer; none if it was cut short (max_tokens)."""
        assert self.tools is not None
        try:
            value = json.loads(self.forced_text)
        except json.JSONDecodeError:
            return []
        helper = ToolParser(self.tools.tool_names)
        if self.tools.kind == "named":
            call = helper.make_call(self.tools.function, value)
            return [call] if call else []
        if not isinstance(value, list):
            return []
        calls = [helper.make_call(v.get("name"), v.get("parameters")) for v in value
                 if isinstance(v, dict)]
        return [c for c in calls if c is not None]


def merge_deltas(deltas: list[dict]) -> dict:
    """The message that a list of delta dicts adds up to."""
    message: dict = {"role": "assistant", "content": None}
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            entry = calls.setdefault(tc["index"], {"id": None, "type": "function",
                                                   "function": {"name": None, "arguments": ""}})
            if "id" in tc:
                entry["id"] = tc["id"]
                entry["function"]["name"] = tc["function"]["name"]
            entry["function"]["arguments"] += tc["function"].get("arguments", "")
    if content:
        message["content"] = content
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message
