"""Token usage read from upstream responses without parsing whole bodies."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Inside JSON strings every quote is escaped, so an unescaped `"prompt_tokens":` is a real key.
_PROMPT = re.compile(rb'(?<!\\)"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'(?<!\\)"completion_tokens"\s*:\s*(\d+)')
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
_EVENT_END = re.compile(rb"\r?\n\r?\n")
# A stream that really ended says so: a choice's finish reason (a string, not null) or [DONE].
# OpenAI streams end with a finish_reason and [DONE]; Anthropic's (/v1/messages) with message_stop.
_FINISHED = re.compile(
    rb'(?<!\\)"finish_reason"\s*:\s*"|^data:\s*\[DONE\]|"type"\s*:\s*"message_stop"', re.MULTILINE
)
_TAIL = 512  # bytes of the previous chunk kept so a usage object split across chunks is found


@dataclass
class Usage:
    """Tokens a request used; `reported` is False when the backend sent no usage."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    reported: bool = False

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def scan(self, data: bytes) -> None:
        """Take the last usage numbers found in `data` (cumulative usage: the last one wins)."""
        prompts = _PROMPT.findall(data)
        if not prompts:
            return
        completions = _COMPLETION.findall(data)
        self.prompt_tokens = int(prompts[-1])
        self.completion_tokens = int(completions[-1]) if completions else 0
        self.reported = True


class SseUsageTap:
    """Relays an SSE byte stream, noting its usage and data events.

    With `strip_usage_event`, the stream is cut at event boundaries and the usage-only event
    (empty `choices`) that the gateway asked for on the client's behalf is dropped, so the
    client sees exactly the stream it asked for. Otherwise bytes pass through untouched.
    """

    def __init__(self, strip_usage_event: bool) -> None:
        self.strip = strip_usage_event
        self.usage = Usage()
        self.data_events = 0  # counted as a completion-token estimate when no usage is reported
        self.finished = False  # a finish_reason or [DONE] went by
        self._pending = b""  # strip mode: an incomplete event; pass mode: the previous chunk's tail

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to send on to the client for this upstream chunk."""
        self.data_events += chunk.count(b"data:")
        window = self._pending + chunk
        if not self.finished and _FINISHED.search(window):
            self.finished = True
        if not self.strip:
            if b"_tokens" in window:
                self.usage.scan(window)
            self._pending = window[-_TAIL:]
            return chunk
        parts = _EVENT_END.split(window)
        self._pending = parts.pop()  # after the last separator: not a whole event yet
        if not parts:
            return b""
        kept = []
        for event in parts:
            if b"_tokens" in event and _EMPTY_CHOICES.search(event):
                self.usage.scan(event)
                self.data_events -= 1
                continue
            if b"_tokens" in event:
                self.usage.scan(event)
            kept.append(event + b"\n\n")
        return b"".join(kept)

    def flush(self) -> bytes:
        """Whatever is held back when the stream ends."""
        rest, self._pending = (self._pending if self.strip else b""), b""
        return rest
