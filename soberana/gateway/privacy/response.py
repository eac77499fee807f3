"""What the privacy layer does to one attempt's answer: put values back, check the output."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from soberana.gateway.errors import GatewayError, sse_error_event
from soberana.gateway.privacy.guardrails import RulesGuard, Verdict
from soberana.gateway.privacy.rehydrator import Rehydrator, SseRehydrator

_WINDOW = 256  # chars of earlier output kept so a rule split across deltas still matches


class ResponseTransform:
    """Rehydration and the output check for one upstream attempt (body or SSE stream)."""

    def __init__(
        self,
        rehydrator: Rehydrator | None,
        output_action: str,
        rules: RulesGuard | None,
        model_check: Callable[[str, str], Awaitable[Verdict]] | None,
        on_verdict: Callable[[Verdict], None],
        stream_window_chars: int = 0,
    ) -> None:
        self.rehydrator = rehydrator or Rehydrator({})
        self.stream = SseRehydrator(self.rehydrator)
        self.stream.collect = output_action != "off"
        self.output_action = output_action  # off | log | flag | block
        self.rules = rules  # streams are checked incrementally with the rules engine
        self.model_check = model_check
        self.on_verdict = on_verdict
        self.window = ""
        self.blocked = False  # the output check stopped the stream; the rest is dropped
        self.flagged = False
        # A guard model cannot run on every delta, so with `block` a stream's text is held back
        # until the model has passed it: nothing reaches the client unchecked. Window 0 holds
        # the whole answer (one check, on the complete output); a window of N characters
        # releases the answer in steps, each after a check of all the text so far.
        self.hold = output_action == "block" and model_check is not None
        self.stream_window_chars = stream_window_chars
        self.held_bytes = b""  # rehydrated events not yet released
        self.answer_text: list[str] = []  # every text delta so far, for the guard model
        self.unchecked_chars = 0  # text received since the last passing check
        self.last_pass: Verdict | None = None

    async def body(self, status: int, raw: bytes) -> tuple[int, bytes]:
        """A whole answer, rehydrated; replaced by an error if the output check blocks it."""
        out = self.rehydrator.body(raw)
        if self.output_action == "off" or status != 200:
            return status, out
        verdict = await self._check_text(_answer_text(out))
        self.on_verdict(verdict)
        if self.output_action == "block" and verdict.result != "pass":
            error = _output_blocked(verdict)
            return error.status, json.dumps(error.body()).encode()
        return status, out

    async def feed(self, chunk: bytes) -> bytes:
        """One upstream chunk of an SSE stream, rehydrated (and cut if the output is blocked)."""
        if self.blocked:
            return b""
        out = self.stream.feed(chunk)
        if self.hold:
            return await self._hold(out, end=False)
        return self._check_stream(out)

    async def flush(self) -> bytes:
        """The end of the stream (or of what the backend sent): what is still held back."""
        if self.blocked:
            return b""
        out = self.stream.flush()
        if self.hold:
            return await self._hold(out, end=True)
        return self._check_stream(out)

    async def finish_stream(self) -> None:
        """After a stream the guard model did not hold (`log`/`flag`): its verdict on the whole
        answer, recorded only, since the client already has it."""
        if self.output_action == "off" or self.model_check is None or self.flagged or self.hold:
            return
        self.on_verdict(await self.model_check("output", "".join(self.answer_text)))

    async def _hold(self, out: bytes, end: bool) -> bytes:
        """Keep `out` until the guard model passes all text so far; release or replace it."""
        text = "".join(self.stream.emitted)
        self.stream.emitted.clear()
        self.answer_text.append(text)
        self.unchecked_chars += len(text)
        self.held_bytes += out
        window = self.stream_window_chars
        if not end and not (window and self.unchecked_chars >= window):
            return b""
        if self.unchecked_chars or self.last_pass is None:
            verdict = await self.model_check("output", "".join(self.answer_text))
            if verdict.result != "pass":
                self.flagged = self.blocked = True
                self.held_bytes = b""
                self.on_verdict(verdict)
                error = _output_blocked(verdict)
                return sse_error_event(error.message, error.code)
            self.last_pass, self.unchecked_chars = verdict, 0
        if end:
            self.on_verdict(self.last_pass)  # one verdict per answer, however many windows
        released, self.held_bytes = self.held_bytes, b""
        return released

    def _check_stream(self, out: bytes) -> bytes:
        if self.model_check is not None:
            self.answer_text.extend(self.stream.emitted)  # checked whole by finish_stream
        if self.output_action == "off" or self.rules is None:
            self.stream.emitted.clear()
            return out
        text = self.window + "".join(self.stream.emitted)
        self.stream.emitted.clear()
        self.window = text[-_WINDOW:]
        if self.flagged:
            return out
        verdict = self.rules.check("output", text)
        if verdict.result == "pass":
            return out
        self.flagged = True
        self.on_verdict(verdict)
        if self.output_action != "block":
            return out
        self.blocked = True
        error = _output_blocked(verdict)
        return sse_error_event(error.message, error.code)

    async def _check_text(self, text: str) -> Verdict:
        if self.model_check is not None:
            return await self.model_check("output", text)
        return self.rules.check("output", text) if self.rules else Verdict("output", "pass")


def _output_blocked(verdict: Verdict) -> GatewayError:
    return GatewayError(
        403,
        f"the answer was withheld by the output guardrail ({verdict.result}: {verdict.rule})",
        "output_guardrail_blocked",
        type_="guardrail_error",
    )


def _answer_text(raw: bytes) -> str:
    """The text of a chat/completions/messages answer, for the output check."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")
    if not isinstance(doc, dict):
        return ""
    parts: list[str] = []
    for choice in doc.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        message = choice.get("message") or {}
        parts.append(str(message.get("content") or choice.get("text") or ""))
        for call in message.get("tool_calls") or []:
            parts.append(str((call.get("function") or {}).get("arguments", "")))
    for block in doc.get("content") or []:
        if isinstance(block, dict):
            parts.append(str(block.get("text") or block.get("input") or ""))
    return "\n".join(parts)
