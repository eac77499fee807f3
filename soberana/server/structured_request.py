"""From a request's response_format / structured_outputs / guided_* / tool_choice to the
engine's StructuredOutputsParams, checked by compiling it here first (a 400 naming the
constraint when it is malformed or does not compile in time; the engine never sees it)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from soberana.server.errors import bad_request
from soberana.server.protocol import SamplingFields
from soberana.structured.compiler import (
    GrammarCompiler,
    GrammarError,
    build_ll_tokenizer,
)
from soberana.structured.params import StructuredOutputsParams


def requested_constraint(body: SamplingFields) -> tuple[StructuredOutputsParams | None, str | None]:
    """The output constraint a body asks for, and the parameter that asked (None, None if
    none). More than one way of asking is a 400."""
    found: list[tuple[str, dict[str, Any]]] = []
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", {"json_object": True}))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise bad_request("response_format json_schema needs json_schema.schema",
                              "response_format.json_schema")
        found.append(("response_format", {"json": fmt.json_schema.schema_}))
    so = body.structured_outputs
    if so is not None:
        fields = {"json": so.json_, "regex": so.regex, "choice": so.choice,
                  "grammar": so.grammar, "json_object": so.json_object or None}
        found.append(("structured_outputs", {k: v for k, v in fields.items() if v is not None}))
    for name in ("json", "regex", "choice", "grammar"):
        value = getattr(body, f"guided_{name}")
        if value is not None:
            found.append((f"guided_{name}", {name: value}))
    if not found:
        return None, None
    if len(found) > 1:
        raise bad_request(
            f"{found[0][0]} and {found[1][0]} both constrain the output; give one",
            param=found[1][0],
        )
    param, fields = found[0]
    try:
        return StructuredOutputsParams(**fields), param
    except ValueError as exc:
        raise bad_request(str(exc), param=param) from exc


def grammar_compiler(engine: Any) -> GrammarCompiler:
    """The API process's compiler (built on first use, kept on the engine client)."""
    compiler = getattr(engine, "grammar_compiler", None)
    if compiler is None:
        info = engine.model_info
        ll_tok = build_ll_tokenizer(engine.tokenizer, info.vocab_size, info.eos_token_ids)
        compiler = GrammarCompiler(ll_tok, engine.agent_options.structured_outputs_timeout)
        engine.grammar_compiler = compiler
    return compiler


async def check_constraint(engine: Any, params: StructuredOutputsParams, param: str) -> None:
    """Compile `params` off the event loop within the time limit; a 400 naming it if not."""
    loop = asyncio.get_running_loop()
    compiler = await loop.run_in_executor(None, grammar_compiler, engine)
    try:
        await loop.run_in_executor(None, compiler.compile, params)
    except GrammarError as exc:
        raise bad_request(str(exc), param=param, code="invalid_structured_output") from exc


def special_token_lookup(tokenizer: Any, ll_tokenizer: Any) -> Callable[[str], int | None]:
    """`text` -> its token id when the tokenizer holds it as one token that llguidance treats
    as special (kept apart from text, so a grammar must name it by id); None otherwise."""

    def lookup(text: str) -> int | None:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1 and ll_tokenizer.is_special_token(ids[0]):
            return ids[0]
        return None

    return lookup
