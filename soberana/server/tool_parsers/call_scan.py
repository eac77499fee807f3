"""Reads calls written as JSON objects `{"name": ..., "arguments": {...}}` as far as they are
written, so their arguments can stream token by token and every parser reports the arguments
exactly as the model wrote them (the streamed fragments then add up to the whole call).

The shape is the one the models are trained on and the call grammar enforces: "name" first,
then the arguments object. Anything else is not read here (the parsers still parse it whole).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass


@dataclass
class CallScan:
    """One call as far as it is written."""

    name: str
    arguments: str  # the arguments object's text so far
    complete: bool  # the call's object is closed
    end: int  # where the scan stopped in the text (past the object when complete)


def _head(key: str) -> re.Pattern:
    return re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"' + re.escape(key)
                      + r'"\s*:\s*(?=\{)')


_HEADS = {key: _head(key) for key in ("arguments", "parameters")}


def scan_call(text: str, start: int, key: str) -> CallScan | None:
    """The call object beginning at `text[start]` (after optional whitespace), or None while
    its name and arguments key are not yet written (or it has another shape)."""
    head = _HEADS[key].match(text, start)
    if head is None:
        return None
    try:
        name = json.loads(f'"{head.group(1)}"')
    except json.JSONDecodeError:
        return None
    begin = i = head.end()
    depth, in_string, escaped = 0, False, False
    while i < len(text):
        c = text[i]
        i += 1
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                break
    arguments = text[begin:i]
    if depth != 0 or not arguments:
        return CallScan(name, arguments, False, i)
    close = re.compile(r"\s*\}").match(text, i)
    if close is None:
        return CallScan(name, arguments, False, i)
    return CallScan(name, arguments, True, close.end())


def scan_calls(text: str, key: str, layout: str) -> list[CallScan]:
    """The calls of one block as far as written. `layout`: "one" (a single object), "array"
    (`[obj, obj]`) or "semicolons" (`obj; obj`)."""
    i = 0
    if layout == "array":
        opening = re.compile(r"\s*\[").match(text)
        if opening is None:
            return []
        i = opening.end()
    calls: list[CallScan] = []
    while True:
        call = scan_call(text, i, key)
        if call is None:
            return calls
        calls.append(call)
        if not call.complete or layout == "one":
            return calls
        sep = re.compile(r"\s*," if layout == "array" else r"\s*;").match(text, call.end)
        if sep is None:
            return calls
        i = sep.end()


def raw_arguments(text: str, key: str, layout: str, names: list[str]) -> list[str] | None:
    """The arguments as written of the calls in `text`, if its calls have the usual shape and
    are the `names` given (in order); None otherwise."""
    calls = scan_calls(text, key, layout)
    if [c.name for c in calls] != names or not all(c.complete for c in calls):
        return None
    return [c.arguments for c in calls]
