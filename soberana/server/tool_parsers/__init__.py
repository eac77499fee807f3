"""Tool-call parsers: from a model's own call syntax to OpenAI tool calls (vLLM's names).

Each parser's `split(text, final, at_start)` cuts generated text into decided segments
(plain text, or a parsed call) and says how many characters it consumed; what it did not
consume may still become a call and is held back. Streaming calls it on the text not yet
consumed after every delta, and an answer that is not streamed is the same calls with one
delta, so both give the same calls wherever the text was split.
"""

from __future__ import annotations

from soberana.server.tool_parsers.base import ParsedCall, Segment, ToolParser
from soberana.server.tool_parsers.formats import (
    HermesToolParser,
    Llama3JsonToolParser,
    MistralToolParser,
    PythonicToolParser,
)

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
    "pythonic": PythonicToolParser,
}


def detect_tool_parser(chat_template: str | None) -> str | None:
    """The parser a chat template's own call syntax needs (None: the template has none)."""
    if not chat_template:
        return None
    if "<tool_call>" in chat_template:
        return "hermes"
    if "[TOOL_CALLS]" in chat_template:
        return "mistral"
    if "<|python_tag|>" in chat_template or ("ipython" in chat_template and "parameters" in chat_template):
        return "llama3_json"
    if "<|python_start|>" in chat_template:
        return "pythonic"
    return None


__all__ = ["TOOL_PARSERS", "ParsedCall", "Segment", "ToolParser", "detect_tool_parser"]
