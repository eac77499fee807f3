"""The call syntaxes of the common open models (as vLLM's parsers of the same names)."""

from __future__ import annotations

import ast
import secrets

from soberana.server.tool_parsers.base import (
    _ALNUM,
    FENCE,
    FENCE_CLOSE,
    ParsedCall,
    Segment,
    ToolParser,
    held_prefix,
    json_values,
)


class HermesToolParser(ToolParser):
    """Qwen2.5, Qwen3, Hermes: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
    anywhere in the answer, one block per call.

    Also a fenced json block (FENCE ... FENCE_CLOSE) holding exactly one object
    `{"name": <a tool>, "arguments": {...}}`, name first: Qwen2.5-Coder writes its calls so,
    not in `<tool_call>` tags, whatever its template asks. Any other fenced block stays text.
    Held by the call grammar, a fenced call streams and is cut by max_tokens as a tagged one."""

    name = "hermes"
    markers = ("<tool_call>", FENCE)
    layout = "one"
    _close = "</tool_call>"

    def open_block(self, pending: str, at_start: bool) -> int | None:
        # `split` stops at an unclosed block's marker, so pending then starts with it. A
        # fenced block that is not a call never reads as one (its name is no tool's).
        for marker in self.markers:
            if pending.startswith(marker):
                return len(marker)
        return None

    def split(self, text: str, final: bool, at_start: bool) -> tuple[list[Segment], int]:
        segments: list[Segment] = []
        i = 0
        while True:
            found = [(j, m) for m in self.markers if (j := text.find(m, i)) >= 0]
            if not found:
                keep = 0 if final else held_prefix(text[i:], self.markers)
                if len(text) - keep > i:
                    segments.append(text[i : len(text) - keep])
                return segments, len(text) - keep
            j, open_ = min(found)
            fenced = open_ == FENCE
            close = FENCE_CLOSE if fenced else self._close
            parse = self._fenced_call if fenced else self._call
            if j > i:
                segments.append(text[i:j])
            k = text.find(close, j + len(open_))
            if k < 0:
                if not final:
                    return segments, j
                # Ended without its closing tag (EOS right after the JSON, or cut short):
                # a call only if the JSON is whole.
                segments.append(parse(text[j + len(open_) :]) or text[j:])
                return segments, len(text)
            end = k + len(close)
            segments.append(parse(text[j + len(open_) : k]) or text[j:end])
            i = end

    def _call(self, body: str) -> ParsedCall | None:
        values = json_values(body)
        if not values or len(values) != 1 or not isinstance(values[0], dict):
            return None
        obj = values[0]
        key = "arguments" if "arguments" in obj else "parameters"
        call = self.make_call(obj.get("name"), obj.get(key))
        return self.with_raw_arguments([call], body, key)[0] if call else None

    def _fenced_call(self, body: str) -> ParsedCall | None:
        values = json_values(body)
        if (not values or len(values) != 1 or not isinstance(values[0], dict)
                or list(values[0])[:1] != ["name"] or set(values[0]) != {"name", "arguments"}):
            return None  # a JSON example, not a call: the grammar left it free
        return self._call(body)


class _WholeAnswerParser(ToolParser):
    """Formats where the answer is either calls from its first character, or text."""

    prefixes: tuple[str, ...] = ()  # optional tags before the calls

    def split(self, text: str, final: bool, at_start: bool) -> tuple[list[Segment], int]:
        if not at_start:
            return ([text] if text else []), len(text)
        body = text.lstrip()
        for prefix in self.prefixes:
            if body.startswith(prefix):
                body = body[len(prefix) :].lstrip()
                break
            if prefix.startswith(body) and not final:
                return [], 0  # could still be the tag
        if not body:
            return ([], 0) if not final else (([text] if text else []), len(text))
        if not body.startswith(self.markers[0]):
            return [text], len(text)  # plain text: nothing in it is a call
        if not final:
            return [], 0
        calls = self._calls(body)
        return (calls if calls else [text]), len(text)

    def open_block(self, pending: str, at_start: bool) -> int | None:
        if not at_start or self.layout is None:
            return None
        body = pending.lstrip()
        for prefix in self.prefixes:
            if body.startswith(prefix):
                body = body[len(prefix):].lstrip()
        if not body.startswith(self.markers[0]):
            return None
        return len(pending) - len(body)

    def _calls(self, body: str) -> list[ParsedCall] | None:
        raise NotImplementedError


class Llama3JsonToolParser(_WholeAnswerParser):
    """Llama 3.1/3.2 JSON calls: `{"name": ..., "parameters": {...}}` (several joined by `;`),
    optionally after `<|python_tag|>`."""

    name = "llama3_json"
    markers = ("{",)
    prefixes = ("<|python_tag|>",)
    needs_special_tokens = True
    layout = "semicolons"
    arguments_key = "parameters"

    def _calls(self, body: str) -> list[ParsedCall] | None:
        body = body.replace("<|python_tag|>", ";")
        values = json_values(body)
        if not values:
            return None
        calls = []
        for obj in values:
            if not isinstance(obj, dict):
                return None
            call = self.make_call(obj.get("name"), obj.get("parameters", obj.get("arguments")))
            if call is None:
                return None
            calls.append(call)
        key = "parameters" if "parameters" in values[0] else "arguments"
        return self.with_raw_arguments(calls, body, key)


class PythonicToolParser(_WholeAnswerParser):
    """Llama 3.2/4 pythonic calls: `[get_weather(city="Paris"), get_time(zone="CET")]`."""

    name = "pythonic"
    markers = ("[",)
    prefixes = ("<|python_start|>",)
    needs_special_tokens = True

    def _calls(self, body: str) -> list[ParsedCall] | None:
        body = body.replace("<|python_end|>", "").strip()
        try:
            tree = ast.parse(body, mode="eval").body
        except SyntaxError:
            return None
        if not isinstance(tree, ast.List) or not tree.elts:
            return None
        calls = []
        for node in tree.elts:
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
                return None
            try:
                arguments = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
            except (ValueError, SyntaxError):
                return None
            if None in arguments:  # **kwargs
                return None
            call = self.make_call(node.func.id, arguments)
            if call is None:
                return None
            calls.append(call)
        return calls


class MistralToolParser(ToolParser):
    """Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or from tokenizer v11
    `[TOOL_CALLS]name[ARGS]{...}` per call. Call ids are 9 letters and digits, which
    Mistral's chat templates require when the call is sent back."""

    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    needs_special_tokens = True
    layout = "array"

    def open_block(self, pending: str, at_start: bool) -> int | None:
        # `split` stops at the marker until the answer ends, so pending then starts with it.
        return len(self.markers[0]) if pending.startswith(self.markers[0]) else None

    def split(self, text: str, final: bool, at_start: bool) -> tuple[list[Segment], int]:
        j = text.find(self.markers[0])
        if j < 0:
            keep = 0 if final else held_prefix(text, self.markers)
            return ([text[: len(text) - keep]] if len(text) > keep else []), len(text) - keep
        segments: list[Segment] = [text[:j]] if j else []
        if not final:
            return segments, j
        calls = self._calls(text[j:])
        segments += calls if calls else [text[j:]]
        return segments, len(text)

    def new_id(self) -> str:
        return "".join(secrets.choice(_ALNUM) for _ in range(9))

    def _calls(self, text: str) -> list[ParsedCall] | None:
        parts = [p.strip() for p in text.split(self.markers[0]) if p.strip()]
        calls: list[ParsedCall] = []
        for part in parts:
            if part.startswith("["):
                values = json_values(part)
                if not values or len(values) != 1 or not isinstance(values[0], list):
                    return None
                found = []
                for obj in values[0]:
                    call = (self.make_call(obj.get("name"), obj.get("arguments"))
                            if isinstance(obj, dict) else None)
                    if call is None:
                        return None
                    found.append(call)
                calls += self.with_raw_arguments(found, part, "arguments")
            elif "[ARGS]" in part:
                name, _, args = part.partition("[ARGS]")
                call = self.make_call(name.strip(), args.strip())
                if call is None:
                    return None
                calls.append(call)
            else:
                return None
        return calls or None

