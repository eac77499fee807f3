"""Reasoning parsers: the model's thinking (`<think>...</think>`) apart from its answer.

`qwen3`: the answer starts in thinking only when it opens with `<think>` (or the prompt left
one open); with `enable_thinking: false` Qwen3's template closes an empty block in the
prompt, and the whole answer is content. `deepseek_r1`: the template opens the block in the
prompt, so the answer is thinking until `</think>` (a leading `<think>` is dropped).
"""

from __future__ import annotations

from soberana.server.tool_parsers.base import held_prefix

THINK_START = "<think>"
THINK_END = "</think>"
REASONING_PARSERS = ("qwen3", "deepseek_r1")


def starts_in_reasoning(parser: str, prompt_text: str | None) -> bool | None:
    """Whether the answer begins inside a thinking block: True, False, or None (qwen3 with
    no open block in the prompt: it depends on whether the answer opens one)."""
    prompt = prompt_text or ""
    opened = prompt.rfind(THINK_START)
    open_in_prompt = opened >= 0 and prompt.find(THINK_END, opened) < 0
    if open_in_prompt:
        return True
    if opened >= 0 and prompt.rstrip().endswith(THINK_END):
        return False  # the template closed an empty block: thinking is off
    return True if parser == "deepseek_r1" else None


class ReasoningSplitter:
    """Splits streamed text into reasoning and content deltas, holding back any text that
    could be the start of a tag."""

    def __init__(self, parser: str, prompt_text: str | None) -> None:
        if parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning parser must be one of {REASONING_PARSERS}; got {parser!r}")
        start = starts_in_reasoning(parser, prompt_text)
        # "undecided": the answer may open a block with its first characters.
        self.state = {True: "reasoning", False: "content", None: "undecided"}[start]
        self.may_open = parser == "deepseek_r1" or start is None  # a leading <think> is a tag
        self.buffer = ""
        self.ended = self.state == "content"
        self.reasoning_seen = False
        self._skip_newlines = False

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """(reasoning, content) decided by this delta."""
        self.buffer += text
        reasoning = content = ""
        if self.state in ("undecided", "reasoning") and self.may_open:
            head = self.buffer.lstrip()
            if head.startswith(THINK_START):
                self.buffer = head[len(THINK_START):]
                self.state, self.may_open = "reasoning", False
            elif THINK_START.startswith(head) and not final:
                return "", ""  # still could be the tag
            else:
                self.may_open = False
                if self.state == "undecided":
                    self.state = "content"
                    self.ended = True
        if self.state == "reasoning":
            end = self.buffer.find(THINK_END)
            if end >= 0:
                reasoning = self.buffer[:end]
                self.buffer = self.buffer[end + len(THINK_END):]
                self.state, self.ended = "content", True
                self._skip_newlines = True  # the template's blank line after the block
            else:
                keep = 0 if final else held_prefix(self.buffer, (THINK_END,))
                reasoning = self.buffer[: len(self.buffer) - keep]
                self.buffer = self.buffer[len(self.buffer) - keep:]
                if reasoning:
                    self.reasoning_seen = True
                return reasoning, ""
        if self.state == "content":
            if self._skip_newlines:
                self.buffer = self.buffer.lstrip("\n")
                self._skip_newlines = not self.buffer
            content, self.buffer = self.buffer, ""
        if reasoning:
            self.reasoning_seen = True
        return reasoning, content
