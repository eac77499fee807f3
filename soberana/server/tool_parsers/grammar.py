"""The grammar of `tool_choice: auto`: free text, and once the model starts a call in its own
syntax (hermes `<tool_call>`, llama3_json `{`, mistral `[TOOL_CALLS]`), the call is held to
the tool's parameter schema until it ends. So an `auto` call is always a known function with
valid JSON arguments; the text around it is untouched.

The grammar is Lark as llguidance reads it. Where the call starts mid-text, the text and the
start marker form one lazy lexeme (it ends at the marker's first occurrence: llguidance's
"structural tag" shape); a marker that is a special token is named by its id (`<[id]>`),
because llguidance keeps special tokens apart from text.
"""

from __future__ import annotations

import json
from collections.abc import Callable

# The JSON the models write and the parsers read: ", " and ": ", nothing else between tokens.
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
                "lenient": True}
_ANY_TEXT = r"(.|\n)*"

# A marker's token id if the tokenizer holds it as one special token (None: it is text).
SpecialTokenId = Callable[[str], "int | None"]


def auto_call_grammar(parser: str, tool_schemas: dict[str, dict], parallel: bool,
                      special_token_id: SpecialTokenId) -> str | None:
    """Lark for `tool_choice: auto` with `parser`'s syntax, or None where the syntax is not
    JSON (pythonic: its calls are parsed, not constrained)."""
    build = _BUILDERS.get(parser)
    return build(tool_schemas, parallel, special_token_id) if build else None


def calls_schema(tool_schemas: dict[str, dict], arguments_key: str) -> dict:
    """One call `{"name": ..., arguments_key: {...}}` to any of the tools (name first, as the
    models write it and the streaming parser reads it)."""
    return {"anyOf": [
        {"type": "object",
         "properties": {"name": {"const": name}, arguments_key: schema},
         "required": ["name", arguments_key], "additionalProperties": False}
        for name, schema in tool_schemas.items()]}


def _json(schema: dict) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": _JSON_LAYOUT})


def _marker(text: str, special_token_id: SpecialTokenId) -> tuple[str, bool]:
    """The marker as a Lark terminal, and whether it is a special token."""
    token = special_token_id(text)
    return (f"<[{token}]>", True) if token is not None else (json.dumps(text), False)


def _triggered(marker: str, special: bool, body: str, parallel: bool) -> str:
    """Text, then calls that each start with `marker` (at most one unless `parallel`)."""
    repeat = "*" if parallel else "?"
    if special:  # text cannot hold a special token: the marker is unambiguous
        opening = f"call_start: TEXT {marker}"
    else:
        opening = f"call_start[lazy]: TEXT {marker}"
    return (f"%llguidance {{}}\nstart: call{repeat} TEXT\n{opening}\n"
            f"call: call_start {body}\nTEXT: /{_ANY_TEXT}/\n")


def _hermes(tools: dict[str, dict], parallel: bool, special: SpecialTokenId) -> str:
    marker, is_special = _marker("<tool_call>", special)
    close, _ = _marker("</tool_call>", special)
    body = f'"\\n" {_json(calls_schema(tools, "arguments"))} "\\n" {close}'
    return _triggered(marker, is_special, body, parallel)


def _mistral(tools: dict[str, dict], parallel: bool, special: SpecialTokenId) -> str:
    marker, is_special = _marker("[TOOL_CALLS]", special)
    array: dict = {"type": "array", "items": calls_schema(tools, "arguments"), "minItems": 1}
    if not parallel:
        array["maxItems"] = 1
    # The parser reads everything after the marker as the calls: nothing may follow them.
    opening = (f"call_start: TEXT {marker}" if is_special
               else f"call_start[lazy]: TEXT {marker}")
    return (f"%llguidance {{}}\nstart: TEXT | call_start {_json(array)}\n{opening}\n"
            f"TEXT: /{_ANY_TEXT}/\n")


def _llama3_json(tools: dict[str, dict], parallel: bool, special: SpecialTokenId) -> str:
    # The whole answer is calls (from its first `{`, optionally after <|python_tag|>) or
    # text that does not open with `{`: the parser reads it the same way.
    tag = special("<|python_tag|>")
    prefix = f"<[{tag}]>? " if tag is not None else ""
    more = ' ("; " call)*' if parallel else ""
    return ("%llguidance {}\n"
            f"start: TEXT | {prefix}call{more}\n"
            f"call: {_json(calls_schema(tools, 'parameters'))}\n"
            f"TEXT: /{_ANY_TEXT}/ & ~/[ \\t\\n]*\\{{{_ANY_TEXT}/\n")


_BUILDERS: dict[str, Callable[[dict[str, dict], bool, SpecialTokenId], str]] = {
    "hermes": _hermes,
    "mistral": _mistral,
    "llama3_json": _llama3_json,
}
