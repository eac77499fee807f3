"""Turns a choice's generated text into OpenAI message parts: reasoning, content, tool calls.

One `ChatOutputParser` per choice is fed the text as it streams; an answer that does not
stream is the same parser fed once, so both give the same calls and the same split wherever
the chunks fell. Text that might still become a tag or a call is held back, never lost: what
is left at the end is content.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from soberana.server.reasoning_parsers import ReasoningSplitter
from soberana.server.tool_parsers import TOOL_PARSERS, ParsedCall, ToolParser
from soberana.server.tool_parsers.call_scan import CallScan, scan_calls


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


@dataclass
class _OpenCall:
    """A call announced (id and name sent) whose arguments are still streaming."""

    id: str
    name: str
    sent: str = ""  # the arguments text sent so far


class ChatOutputParser:
    """Incremental split of one choice's text into OpenAI delta dicts.

    `stream_arguments`: the call grammar holds `auto` calls to their schemas, so a call is
    announced (id and name) as soon as its name is written and its arguments stream as they
    are generated; otherwise an `auto` call goes out once it is whole and parsed. Calls of
    `required` and named choices (always grammar-held) always stream.
    """

    def __init__(self, tools: ToolMode | None, reasoning_parser: str | None,
                 prompt_text: str | None, stream_arguments: bool = False) -> None:
        self.tools = tools
        self.reasoning = (ReasoningSplitter(reasoning_parser, prompt_text)
                          if reasoning_parser else None)
        self.tool_parser: ToolParser | None = None
        if tools is not None and tools.kind == "auto" and tools.parser:
            self.tool_parser = TOOL_PARSERS[tools.parser](tools.tool_names)
        self.stream_arguments = stream_arguments and (
            self.tool_parser is None or self.tool_parser.layout is not None)
        self.pending = ""  # content not yet decided by the tool parser
        self.consumed_any = False  # the tool parser has consumed content before
        self.forced_text = ""  # required/named: the whole JSON answer
        self.reasoning_text = ""  # for a call left inside an unclosed thinking block
        self.calls: list[ParsedCall] = []
        self.open: list[_OpenCall] = []  # announced calls not yet whole, in order

    def feed(self, text: str) -> list[dict]:
        """Delta dicts for this piece of generated text."""
        return self._step(text, final=False)

    def finish(self, finish_reason: str | None) -> tuple[list[dict], str | None]:
        """The remaining deltas and the finish reason to report ("tool_calls" when calls
        were made and the model stopped by itself; a call cut by max_tokens keeps "length",
        and its arguments are the text written so far, as OpenAI's are)."""
        deltas = self._step("", final=True)
        if self.tools is not None and self.tools.kind in ("required", "named"):
            deltas += self._forced_step(final=True)
            if not self.calls and self.forced_text:  # cut before a call began: as content
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
            if not final:
                deltas += self._forced_step(final=False)
            return deltas
        if self.tool_parser is None:
            if content:
                deltas.append({"content": content})
            return deltas
        self.pending += content
        block = self._open_block_text() if final and self.open else None
        segments, used = self.tool_parser.split(self.pending, final, not self.consumed_any)
        if used:
            self.consumed_any = True
        self.pending = self.pending[used:]
        for segment in segments:
            if isinstance(segment, ParsedCall):
                deltas += self._emit_calls([segment])
            elif self.open:
                continue  # the text of a block cut short: its calls have streamed
            elif segment and not self.calls or segment.strip():
                deltas.append({"content": segment})
        if block is not None and self.open:  # cut short (max_tokens or a stop string)
            deltas += self._close_open(scan_calls(block, self.tool_parser.arguments_key,
                                                  self.tool_parser.layout or "one"))
        elif not final and self.stream_arguments:
            block = self._open_block_text()
            if block is not None:
                deltas += self._stream(scan_calls(block, self.tool_parser.arguments_key,
                                                  self.tool_parser.layout or "one"))
        return deltas

    def _open_block_text(self) -> str | None:
        assert self.tool_parser is not None
        start = self.tool_parser.open_block(self.pending, not self.consumed_any)
        return None if start is None else self.pending[start:]

    def _forced_step(self, final: bool) -> list[dict]:
        """required: the answer is a JSON array of {"name", "parameters"}; named: the answer
        is the function's arguments. Both stream as they are written."""
        assert self.tools is not None
        if self.tools.kind == "named":
            assert self.tools.function is not None
            scans = [CallScan(self.tools.function, self.forced_text, False, 0)]
        else:
            scans = scan_calls(self.forced_text, "parameters", "array")
        if not final:
            return self._stream(scans)
        return self._close_open(scans)

    def _stream(self, scans: list[CallScan]) -> list[dict]:
        """Announce the calls of `scans` not yet announced and send their new arguments."""
        deltas: list[dict] = []
        for k, scan in enumerate(scans):
            index = len(self.calls) + k
            if k == len(self.open):
                known = self.tools is None or scan.name in self.tools.tool_names
                if not known or not self._may_add(index):
                    break
                self.open.append(_OpenCall(self._new_id(), scan.name))
                deltas.append(_announce(index, self.open[k].id, scan.name))
            call = self.open[k]
            if len(scan.arguments) > len(call.sent) and scan.arguments.startswith(call.sent):
                deltas.append(_arguments(index, scan.arguments[len(call.sent):]))
                call.sent = scan.arguments
        return deltas

    def _close_open(self, scans: list[CallScan]) -> list[dict]:
        """The answer ended: the announced calls get their last arguments and are made."""
        deltas = self._stream(scans)
        for call in self.open:
            self.calls.append(ParsedCall(call.name, call.sent, call.id))
        self.open = []
        return deltas

    def _may_add(self, index: int) -> bool:
        return self.tools is None or self.tools.parallel or index == 0

    def _new_id(self) -> str:
        return (self.tool_parser or ToolParser()).new_id()

    def _emit_calls(self, calls: list[ParsedCall]) -> list[dict]:
        deltas = []
        for call in calls:
            index = len(self.calls)
            if not self._may_add(index):
                break
            announced = self.open.pop(0) if self.open else None
            if announced is not None:  # announced while streaming: send what is left
                call.id = announced.id
                rest = (call.arguments[len(announced.sent):]
                        if call.arguments.startswith(announced.sent) else "")
                if rest:
                    deltas.append(_arguments(index, rest))
                call.arguments = announced.sent + rest
            else:
                deltas.append(_announce(index, call.id, call.name))
                deltas.append(_arguments(index, call.arguments))
            self.calls.append(call)
        return deltas


def _announce(index: int, call_id: str, name: str) -> dict:
    """OpenAI's first chunk of a call: id, type and name, arguments empty."""
    return {"tool_calls": [{"index": index, "id": call_id, "type": "function",
                            "function": {"name": name, "arguments": ""}}]}


def _arguments(index: int, fragment: str) -> dict:
    return {"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}


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
