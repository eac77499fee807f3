"""What a request constrains its output to (vLLM's `StructuredOutputsParams`), and the
llguidance grammar text it compiles to."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

# JSON text of any shape: what `response_format: json_object` asks for.
_ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}
_JSON_OPTIONS = {"whitespace_flexible": False, "lenient": True}
MAX_GRAMMAR_CHARS = 1 << 20  # a bigger schema/grammar is refused before compiling


@dataclass
class StructuredOutputsParams:
    """Exactly one of `json`, `regex`, `choice`, `grammar` or `json_object`.

    `json` is a JSON schema (a dict or its JSON text); `grammar` is Lark (llguidance's
    dialect, which also reads most GBNF-free Lark grammars); `choice` is a list of strings.
    `reasoning_end_token_ids`, set by the server when a reasoning parser is on, delays the
    constraint until the model has emitted that token sequence (its thinking is free text).
    """

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    reasoning_end_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        set_ = [n for n in ("json", "regex", "choice", "grammar") if getattr(self, n) is not None]
        if self.json_object:
            set_.append("json_object")
        if len(set_) != 1:
            raise ValueError(
                "structured_outputs needs exactly one of json, regex, choice, grammar or "
                f"json_object; got {set_ or 'none'}"
            )
        if self.choice is not None and (
            not self.choice or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
        if len(self.source()) > MAX_GRAMMAR_CHARS:
            raise ValueError(
                f"structured_outputs.{set_[0]} is over {MAX_GRAMMAR_CHARS} characters"
            )

    @property
    def kind(self) -> str:
        for name in ("json", "regex", "choice", "grammar"):
            if getattr(self, name) is not None:
                return name
        return "json_object"

    def source(self) -> str:
        """The constraint as text (the cache key's input and what errors quote)."""
        if self.json is not None:
            return self.json if isinstance(self.json, str) else json.dumps(self.json, sort_keys=True)
        if self.regex is not None:
            return self.regex
        if self.choice is not None:
            return json.dumps(self.choice)
        if self.grammar is not None:
            return self.grammar
        return json.dumps(_ANY_JSON_OBJECT)

    def key(self) -> str:
        """Cache key of the compiled grammar: a hash of the kind and the constraint."""
        return hashlib.sha256(f"{self.kind}\0{self.source()}".encode()).hexdigest()

    def llguidance_grammar(self) -> str:
        """The grammar in llguidance's input format; ValueError naming a malformed constraint."""
        from llguidance import LLMatcher

        if self.json is not None or self.json_object:
            schema = self.json if self.json is not None else _ANY_JSON_OBJECT
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from exc
            if not isinstance(schema, (dict, bool)):
                raise ValueError("structured_outputs.json must be a JSON schema object")
            return LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            return LLMatcher.grammar_from_regex("|".join(_escape(c) for c in self.choice))
        assert self.grammar is not None
        return LLMatcher.grammar_from_lark(self.grammar)


def _escape(text: str) -> str:
    """A literal for llguidance's (Rust) regex syntax, which rejects some of Python's escapes."""
    return re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\1", text)
