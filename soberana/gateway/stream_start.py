"""When a stream is committed to its backend: at the first event that carries a token.

Soberana and vLLM send a role-only chunk (`{"delta": {"role": "assistant", "content": ""}}`)
as soon as a request is scheduled, while prefill may run for seconds more. Relaying that
chunk would commit the request to a replica that has produced nothing yet, so one dying
during a long prefill would reach the client although another is healthy. The gateway holds
such empty events back and retries elsewhere until an event with content, a tool call, a
finish reason, usage, an error or `[DONE]` arrives (for Anthropic's /v1/messages streams,
`message_start`, `ping` and an empty text block's start are held the same way).
"""

from __future__ import annotations

import json
import re

_EVENT_END = re.compile(rb"\r?\n\r?\n")
# Empty events never fill this much; past it, relay whatever came (a backend's own format).
MAX_HELD_BYTES = 64 * 1024


def first_token_reached(held: bytes) -> bool:
    """True once `held` (the stream so far) has a complete event that is more than a preamble."""
    if len(held) > MAX_HELD_BYTES:
        return True
    complete = _EVENT_END.split(held)[:-1]  # the part after the last separator is unfinished
    return any(not _is_preamble(event) for event in complete)


def _is_preamble(event: bytes) -> bool:
    """An event announcing a role (or nothing at all: comments, keep-alives)."""
    lines = event.splitlines()
    data = b"".join(line[5:].strip() for line in lines if line.startswith(b"data:"))
    if not data:
        return True
    try:
        chunk = json.loads(data)
    except ValueError:  # [DONE], or a format this module does not know: commit
        return False
    if not isinstance(chunk, dict) or chunk.get("usage") or "error" in chunk:
        return False
    kind = chunk.get("type")  # Anthropic's /v1/messages events
    if kind in ("message_start", "ping"):
        return True
    if kind == "content_block_start":
        block = chunk.get("content_block")
        return isinstance(block, dict) and block.get("type") == "text" and not block.get("text")
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    for choice in choices:
        if not isinstance(choice, dict) or choice.get("finish_reason") is not None:
            return False
        if choice.get("text"):  # /v1/completions
            return False
        delta = choice.get("delta", {})
        if not isinstance(delta, dict) or any(v for k, v in delta.items() if k != "role"):
            return False
    return True
