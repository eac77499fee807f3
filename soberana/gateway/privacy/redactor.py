"""Replace PII in a request body by numbered placeholders (`<IBAN_CODE_1>`), one mapping per request.

Every string of the body is scanned except structural fields (model, role, ids, tool schemas),
so message text, content parts, tool-call arguments, tool results, `/v1/messages` blocks,
`system`, `prompt` and embedding `input` are all covered, including shapes this module has
never seen: an unknown field is redacted, not skipped. Tool-call `arguments` are JSON inside a
string; they are parsed, their values redacted, and written back as JSON.

A value under a key that names a person, place or organisation (`customer_name`, `ciudad`) is
redacted whole as that type (`field_hints`): NER misses bare names without a sentence around
them. The name of a called tool (`function.name`, a tool_use block's `name`, a tool message's
`name`) is an identifier declared in `tools`, not user text: an NER model reads `get_weather`
as a person, and a renamed call would no longer match its schema.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

from soberana.gateway.privacy.detector import Detector
from soberana.gateway.privacy.field_hints import hinted_type
from soberana.gateway.privacy.recognizers import Span
from soberana.gateway.request_info import MAX_JSON_DEPTH, json_depth

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
_TOOL_BLOCKS = frozenset({"tool_use", "server_tool_use"})  # /v1/messages blocks naming a tool
_TOOL_ROLES = frozenset({"tool", "function"})  # messages whose `name` is the tool's


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
    return [text for text, _ in _texts(body, None)]


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
    fields = list(_texts(body, None))
    texts = [text for text, _ in fields]
    spans = await detector.detect_async(texts, entities, timeout_s, ner)
    if ner != "off":
        for i, (text, hint) in enumerate(fields):
            if hint is not None and (entities is None or hint in entities) and text.strip():
                spans[i] = [Span(0, len(text), hint)]  # the whole value, validated parts inside
    redaction = Redaction()
    replaced = iter([redaction.replace(t, s) for t, s in zip(texts, spans)])
    return rebuild(body, replaced), redaction


def _texts(node: Any, key: str | None, json_text: bool = False) -> Iterator[tuple[str, str | None]]:
    """(string, the entity type its field name says it holds or None), in body order."""
    if isinstance(node, str):
        parsed = _json_document(node) if json_text else None
        if parsed is not None:
            yield from _texts(parsed, None)
        else:
            yield node, hinted_type(key)
    elif isinstance(node, bool):
        return
    elif isinstance(node, int):
        if abs(node) >= _MIN_NUMBER:
            yield str(node), None
    elif isinstance(node, dict):
        skip, json_keys = _shape(node, key)
        for k, v in node.items():
            if k not in skip:
                yield from _texts(v, k, k in json_keys)
    elif isinstance(node, list):
        for v in node:
            yield from _texts(v, key, json_text)


def _shape(node: dict[str, Any], key: str | None) -> tuple[frozenset[str], frozenset[str]]:
    """(keys of `node` that go out as they are, keys whose string is a JSON document)."""
    if key in ("function", "function_call") or node.get("type") in _TOOL_BLOCKS:
        return _STRUCTURAL | {"name"}, _JSON_IN_STRING
    if node.get("role") in _TOOL_ROLES:
        # A tool's result is usually JSON as text: parsed, its field names give hints too.
        return _STRUCTURAL | {"name"}, _JSON_IN_STRING | {"content"}
    if node.get("type") == "tool_result":
        return _STRUCTURAL, _JSON_IN_STRING | {"content"}
    return _STRUCTURAL, _JSON_IN_STRING


def _rebuild(node: Any, key: str | None, replaced: Iterator[str], json_text: bool = False) -> Any:
    if isinstance(node, str):
        parsed = _json_document(node) if json_text else None
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
        skip, json_keys = _shape(node, key)
        return {
            k: v if k in skip else _rebuild(v, k, replaced, k in json_keys) for k, v in node.items()
        }
    if isinstance(node, list):
        return [_rebuild(v, key, replaced, json_text) for v in node]
    return node


def _json_document(text: str) -> Any:
    """`text` parsed if it is a JSON object or array, else None (then it is scanned as text).

    A document nested past MAX_JSON_DEPTH is scanned as text too: walking it would exhaust the
    recursion limit (a 500) where scanning the text still finds every value in it.
    """
    stripped = text.lstrip()
    if not stripped.startswith(("{", "[")):
        return None
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return parsed if json_depth(parsed) <= MAX_JSON_DEPTH else None
