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

    def feed(self, chunk: bytes) -> bytes:
        """One upstream chunk of an SSE stream, rehydrated (and cut if the output is blocked)."""
        if self.blocked:
            return b""
        out = self.stream.feed(chunk)
        return self._check_stream(out)

    def flush(self) -> bytes:
        if self.blocked:
            return b""
        return self._check_stream(self.stream.flush())

    async def finish_stream(self) -> None:
        """After a stream: the guard model's verdict on the whole answer (too late to block)."""
        if self.output_action == "off" or self.model_check is None or self.flagged:
            return
        self.on_verdict(await self.model_check("output", "".join(self.stream.emitted)))

    def _check_stream(self, out: bytes) -> bytes:
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
