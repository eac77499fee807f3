"""Put a request's original values back in its answer: whole bodies and SSE streams.

Streams are never buffered whole. Each text field of a stream (a choice's `content`, one tool
call's `arguments`, one `/v1/messages` block's `text` or `partial_json`) keeps back at most the
tail of its last delta that could still grow into a known placeholder (`<IBAN_CO` ...), and
releases it with the next delta or when the field ends. Only this request's placeholders are
replaced; one the model invents or garbles stays as it is.
"""

from __future__ import annotations

import json
import re
from typing import Any

_PLACEHOLDER = re.compile(r"<[A-Z][A-Z0-9_]*_\d+>")
_EVENT_END = re.compile(rb"\r?\n\r?\n")
# Text that is JSON inside a string: a value put back there must be JSON-escaped.
_JSON_TEXT_FIELDS = frozenset({"arguments", "partial_json"})


class Rehydrator:
    """The placeholder -> value mapping of one request, applied to text."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.escaped = {p: json.dumps(v, ensure_ascii=False)[1:-1] for p, v in values.items()}
        self.longest = max((len(p) for p in values), default=0)

    def text(self, text: str, escape: bool = False) -> str:
        """`text` with every known placeholder replaced (escaped for JSON-in-a-string fields)."""
        if "<" not in text:
            return text
        table = self.escaped if escape else self.values
        return _PLACEHOLDER.sub(lambda m: table.get(m.group(0), m.group(0)), text)

    def split_tail(self, text: str) -> tuple[str, str]:
        """(ready, held): `held` is the shortest tail that may still become a known placeholder."""
        at = text.rfind("<", max(0, len(text) - self.longest + 1))
        if at < 0:
            return text, ""
        tail = text[at:]
        if any(len(p) > len(tail) and p.startswith(tail) for p in self.values):
            return text[:at], tail
        return text, ""

    def body(self, raw: bytes) -> bytes:
        """A non-streamed JSON answer with its placeholders put back (non-JSON passes unchanged)."""
        if b"<" not in raw and b"\\u003c" not in raw:
            return raw
        try:
            doc = json.loads(raw)
        except ValueError:
            return raw
        return json.dumps(self._walk(doc, None), ensure_ascii=False).encode()

    def _walk(self, node: Any, key: str | None) -> Any:
        if isinstance(node, str):
            return self.text(node, escape=key in _JSON_TEXT_FIELDS)
        if isinstance(node, dict):
            return {k: self._walk(v, k) for k, v in node.items()}
        if isinstance(node, list):
            return [self._walk(v, key) for v in node]
        return node


class SseRehydrator:
    """Rehydrates an OpenAI or Anthropic SSE stream event by event, holding back only tails."""

    def __init__(self, rehydrator: Rehydrator) -> None:
        self.r = rehydrator
        self.pending = b""  # an incomplete event at the end of the last chunk
        self.held: dict[tuple, str] = {}  # field key -> tail kept back
        self.template: dict[str, Any] = {}  # id/model/... of the last OpenAI chunk, for flushes
        self.emitted: list[str] = []  # rehydrated text released, for the output guardrail
        self.collect = False  # the output guardrail reads every event's text (no fast path)

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to send on for this upstream chunk (whole events only)."""
        data = self.pending + chunk
        parts = _EVENT_END.split(data)
        self.pending = parts.pop()
        return b"".join(self._event(e) for e in parts)

    def flush(self) -> bytes:
        """At the end of the stream: what is left, including any tail still held."""
        rest, self.pending = self.pending, b""
        out = self._event(rest) if rest.strip() else b""
        return out + self._flush_openai(None)

    # ---- one event ---------------------------------------------------------------------------

    def _event(self, event: bytes) -> bytes:
        if not self.held and not self.collect and b"<" not in event and b"\\u003c" not in event:
            return event + b"\n\n"  # nothing to put back and nothing held: pass untouched
        lines = event.decode("utf-8", errors="replace").splitlines()
        data_at = next((i for i, line in enumerate(lines) if line.startswith("data:")), None)
        if data_at is None:
            return event + b"\n\n"
        payload = lines[data_at][5:].strip()
        if payload == "[DONE]":
            return self._flush_openai(None) + event + b"\n\n"
        try:
            obj = json.loads(payload)
        except ValueError:
            return event + b"\n\n"
        if not isinstance(obj, dict):
            return event + b"\n\n"
        before = b""
        if "choices" in obj:
            self._openai(obj)
        elif isinstance(obj.get("type"), str):
            before = self._anthropic(obj)
        lines[data_at] = "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        return before + "\n".join(lines).encode() + b"\n\n"

    def _field(self, key: tuple, text: str, escape: bool) -> str:
        ready, held = self.r.split_tail(self.held.pop(key, "") + text)
        if held:
            self.held[key] = held
        out = self.r.text(ready, escape)
        self.emitted.append(out)
        return out

    # ---- OpenAI chat / completions chunks ------------------------------------------------------

    def _openai(self, obj: dict[str, Any]) -> None:
        self.template = {k: obj[k] for k in ("id", "object", "created", "model") if k in obj}
        for choice in obj.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            i = choice.get("index", 0)
            delta = choice.get("delta")
            if isinstance(delta, dict):
                for name in ("content", "reasoning_content", "refusal"):
                    if isinstance(delta.get(name), str):
                        delta[name] = self._field(("c", i, name), delta[name], False)
                for call in delta.get("tool_calls") or []:
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                        key = ("t", i, call.get("index", 0))
                        fn["arguments"] = self._field(key, fn["arguments"], True)
            if isinstance(choice.get("text"), str):
                choice["text"] = self._field(("x", i, "text"), choice["text"], False)
            if choice.get("finish_reason") is not None:
                self._release_choice(i, choice)

    def _release_choice(self, i: Any, choice: dict[str, Any]) -> None:
        """Append a finishing choice's held tails to its own last delta."""
        for key in [k for k in self.held if k[0] in "ctx" and k[1] == i]:
            tail = self.held.pop(key)
            self.emitted.append(tail)
            if key[0] == "x":
                choice["text"] = choice.get("text", "") + tail
                continue
            delta = choice.setdefault("delta", {})
            if key[0] == "c":
                delta[key[2]] = (delta.get(key[2]) or "") + tail
            else:
                delta.setdefault("tool_calls", []).append(
                    {"index": key[2], "function": {"arguments": tail}}
                )

    def _flush_openai(self, _: None) -> bytes:
        """Held tails of choices that never sent a finish_reason, as one extra chunk."""
        keys = [k for k in self.held if k[0] in "ctx"]
        if not keys:
            return b""
        choices: dict[Any, dict[str, Any]] = {}
        for key in keys:
            choices.setdefault(key[1], {"index": key[1], "delta": {}, "finish_reason": None})
        for i, choice in choices.items():
            self._release_choice(i, choice)
            choice["finish_reason"] = None
        obj = {**self.template, "choices": list(choices.values())}
        return (
            b"data: "
            + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
            + b"\n\n"
        )

    # ---- Anthropic /v1/messages events -------------------------------------------------------

    def _anthropic(self, obj: dict[str, Any]) -> bytes:
        kind = obj["type"]
        if kind == "content_block_delta" and isinstance(obj.get("delta"), dict):
            delta, i = obj["delta"], obj.get("index", 0)
            for name in ("text", "partial_json", "thinking"):
                if isinstance(delta.get(name), str):
                    delta[name] = self._field(
                        ("a", i, name), delta[name], name in _JSON_TEXT_FIELDS
                    )
            return b""
        if kind == "content_block_stop":
            return self._flush_anthropic(obj.get("index", 0))
        if kind in ("message_delta", "message_stop"):
            return self._flush_anthropic(None)
        return b""

    def _flush_anthropic(self, index: Any) -> bytes:
        out = b""
        for key in [k for k in self.held if k[0] == "a" and (index is None or k[1] == index)]:
            tail = self.held.pop(key)
            self.emitted.append(tail)
            kind = {"text": "text_delta", "partial_json": "input_json_delta"}.get(
                key[2], "thinking_delta"
            )
            obj = {
                "type": "content_block_delta",
                "index": key[1],
                "delta": {"type": kind, key[2]: tail},
            }
            out += (
                b"event: content_block_delta\ndata: "
                + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
                + b"\n\n"
            )
        return out
