"""Replace PII in a request body by numbered placeholders (`<IBAN_CODE_1>`), one mapping per request.

Every string of the body is scanned except structural fields (model, role, ids, tool schemas),
so message text, content parts, tool-call arguments, tool results, `/v1/messages` blocks,
`system`, `prompt` and embedding `input` are all covered, including shapes this module has
never seen: an unknown field is redacted, not skipped. Tool-call `arguments` are JSON inside a
string; they are parsed, their values redacted, and written back as JSON.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

from soberana.gateway.privacy.detector import Detector
from soberana.gateway.privacy.recognizers import Span

# Fields that name things rather than carry user text; their values go out as they are.
_STRUCTURAL = frozenset(
    {
        "model",
        "role",
        "type",
        "id",
        "tool_call_id",
        "tool_use_id",
        "cache_salt",
        "stream",
        "stream_options",
        "response_format",
        "tools",
        "functions",
        "tool_choice",
        "logit_bias",
        "finish_reason",
        "object",
        "encoding_format",
        "media_type",
    }
)
_JSON_IN_STRING = frozenset({"arguments"})  # OpenAI tool-call arguments: a JSON document as text
_MIN_NUMBER = 1_000_000  # shorter integers are never an identifier we detect


class Redaction:
    """One request's placeholder mapping. In memory for that request only; never logged."""

    def __init__(self) -> None:
        self.by_value: dict[str, str] = {}  # original value -> placeholder
        self.by_placeholder: dict[str, str] = {}  # placeholder -> original value
        self.counts: Counter[str] = Counter()  # entity type -> distinct values replaced

    def placeholder(self, entity_type: str, value: str) -> str:
        """The value's placeholder; the same value always gets the same one in this request."""
        found = self.by_value.get(value)
        if found is None:
            self.counts[entity_type] += 1
            found = f"<{entity_type}_{self.counts[entity_type]}>"
            self.by_value[value] = found
            self.by_placeholder[found] = value
        return found

    def replace(self, text: str, spans: list[Span]) -> str:
        if not spans:
            return text
        out, at = [], 0
        for s in spans:
            out.append(text[at : s.start])
            out.append(self.placeholder(s.entity_type, text[s.start : s.end]))
            at = s.end
        out.append(text[at:])
        return "".join(out)


def collect_texts(body: Any) -> list[str]:
    """Every string of `body` the redactor scans, in the order `rebuild` consumes them."""
    return list(_texts(body, None))


def rebuild(body: Any, replaced: Iterator[str]) -> Any:
    """A copy of `body` with its scanned strings taken, in order, from `replaced`."""
    return _rebuild(body, None, replaced)


async def redact_body(
    body: dict[str, Any],
    detector: Detector,
    entities: frozenset[str] | None,
    timeout_s: float,
    ner: str = "auto",
) -> tuple[dict[str, Any], Redaction]:
    """The body with its PII replaced, and the mapping to put it back. DetectorError fails closed."""
    texts = collect_texts(body)
    spans = await detector.detect_async(texts, entities, timeout_s, ner)
    redaction = Redaction()
    replaced = iter([redaction.replace(t, s) for t, s in zip(texts, spans)])
    return rebuild(body, replaced), redaction


def _texts(node: Any, key: str | None) -> Iterator[str]:
    if isinstance(node, str):
        parsed = _json_document(node) if key in _JSON_IN_STRING else None
        if parsed is not None:
            yield from _texts(parsed, None)
        else:
            yield node
    elif isinstance(node, bool):
        return
    elif isinstance(node, int):
        if abs(node) >= _MIN_NUMBER:
            yield str(node)
    elif isinstance(node, dict):
        for k, v in node.items():
            if k not in _STRUCTURAL:
                yield from _texts(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from _texts(v, key)


def _rebuild(node: Any, key: str | None, replaced: Iterator[str]) -> Any:
    if isinstance(node, str):
        parsed = _json_document(node) if key in _JSON_IN_STRING else None
        if parsed is not None:
            return json.dumps(_rebuild(parsed, None, replaced), ensure_ascii=False)
        return next(replaced)
    if isinstance(node, bool):
        return node
    if isinstance(node, int):
        if abs(node) < _MIN_NUMBER:
            return node
        text = next(replaced)
        return node if text == str(node) else text  # a detected number goes out as its placeholder
    if isinstance(node, dict):
        return {k: v if k in _STRUCTURAL else _rebuild(v, k, replaced) for k, v in node.items()}
    if isinstance(node, list):
        return [_rebuild(v, key, replaced) for v in node]
    return node


def _json_document(text: str) -> Any:
    """`text` parsed if it is a JSON object or array, else None (then it is scanned as text)."""
    stripped = text.lstrip()
    if not stripped.startswith(("{", "[")):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None
