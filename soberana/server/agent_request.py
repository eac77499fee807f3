"""What a chat request asks of tools, reasoning and structured outputs, decided before the
engine sees it: the tools for the chat template, the parser of each choice's text, and the
output constraint (checked by compiling it here; a 400 names what does not compile)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from soberana.config_flags import flag
from soberana.server.chat_output import ChatOutputParser, ToolMode
from soberana.server.errors import bad_request
from soberana.server.protocol import ChatCompletionRequest
from soberana.server.reasoning_parsers import REASONING_PARSERS, starts_in_reasoning
from soberana.server.structured_request import (
    check_constraint,
    grammar_compiler,
    requested_constraint,
    special_token_lookup,
)
from soberana.server.tool_parsers import TOOL_PARSERS, detect_tool_parser
from soberana.server.tool_parsers.grammar import auto_call_grammar
from soberana.structured.compiler import DEFAULT_COMPILE_TIMEOUT_S
from soberana.structured.params import StructuredOutputsParams


@dataclass
class AgentOptions:
    """The server's flags of tools, reasoning and structured outputs (vLLM's names)."""

    # A parser's name, "auto" (from the chat template), or None ("none" on the command line).
    tool_call_parser: str | None = flag(
        "auto", "how the model writes tool calls: auto (from the chat template), none, or one "
        f"of {', '.join(sorted(TOOL_PARSERS))}")
    reasoning_parser: str | None = flag(
        None, "put the model's thinking into reasoning_content", choices=REASONING_PARSERS)
    structured_outputs_timeout: float = flag(
        DEFAULT_COMPILE_TIMEOUT_S,
        "seconds a grammar may take to compile before the request gets a 400")

    def __post_init__(self) -> None:
        if self.tool_call_parser == "none":
            self.tool_call_parser = None

    def validate(self) -> None:
        if self.tool_call_parser not in (None, "auto", *TOOL_PARSERS):
            raise ValueError(f"--tool-call-parser must be auto or one of {sorted(TOOL_PARSERS)};"
                             f" got {self.tool_call_parser!r}")
        if self.reasoning_parser not in (None, *REASONING_PARSERS):
            raise ValueError(f"--reasoning-parser must be one of {REASONING_PARSERS}; "
                             f"got {self.reasoning_parser!r}")
        if not 0 < self.structured_outputs_timeout <= 600:
            raise ValueError("--structured-outputs-timeout must be in (0, 600] seconds; got "
                             f"{self.structured_outputs_timeout}")


@dataclass
class ChatPlan:
    tools: ToolMode | None  # None: no tools in play (absent, or tool_choice "none")
    template_tools: list[dict] | None
    reasoning_parser: str | None
    constraint: StructuredOutputsParams | None
    constraint_param: str | None
    # tool_choice auto without another constraint: the tools' parameter schemas, which the
    # call grammar holds each call to once the model starts one
    auto_tool_schemas: dict[str, dict] | None = None

    @property
    def parses_output(self) -> bool:
        return self.tools is not None or self.reasoning_parser is not None

    def output_parser(self, prompt_text: str | None) -> ChatOutputParser:
        # Auto calls stream their arguments only while the call grammar holds them.
        return ChatOutputParser(self.tools, self.reasoning_parser, prompt_text,
                                stream_arguments=self.auto_tool_schemas is not None)


def plan_chat(body: ChatCompletionRequest, options: AgentOptions, chat_template: str | None
              ) -> ChatPlan:
    """Tools, parser and constraint of a chat request (400s name the parameter)."""
    constraint, param = requested_constraint(body)
    tools = body.tools or []
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise bad_request("tools holds two functions of the same name", "tools")
    if choice != "none" and not tools:
        raise bad_request("tool_choice needs tools", "tool_choice")
    mode = None
    auto_schemas = None
    parallel = body.parallel_tool_calls is not False
    if choice == "auto":
        parser = options.tool_call_parser
        if parser == "auto":
            parser = detect_tool_parser(chat_template)
        if parser is None:
            raise bad_request(
                "tool_choice auto needs a tool-call parser: this model's chat template has no "
                "known call syntax; serve with --tool-call-parser, or use tool_choice "
                "required or a named function", "tool_choice")
        mode = ToolMode("auto", parser, names, parallel=parallel)
        if constraint is None:  # a user's response_format holds the whole answer instead
            auto_schemas = {t.function.name: _parameters(t.function.parameters) for t in tools}
    elif choice == "required" or not isinstance(choice, str):
        if constraint is not None:
            raise bad_request(f"{param} cannot be combined with tool_choice {choice!r}: the "
                              "calls are the structured output", param)
        tool_schemas = {t.function.name: _parameters(t.function.parameters) for t in tools}
        if choice == "required":
            mode = ToolMode("required", None, names, parallel=parallel)
            constraint = StructuredOutputsParams(json=_calls_schema(tool_schemas, parallel))
        else:
            name = choice.function.name
            if name not in tool_schemas:
                raise bad_request(f"tool_choice names {name!r}, which is not in tools",
                                  "tool_choice")
            mode = ToolMode("named", None, names, function=name, parallel=parallel)
            constraint = StructuredOutputsParams(json=tool_schemas[name])
        param = "tools"
    template_tools = [t.model_dump(exclude_none=True) for t in tools] or None
    return ChatPlan(mode, template_tools, options.reasoning_parser, constraint, param,
                    auto_schemas)


async def prepare_constraint(plan: ChatPlan, engine: Any, prompt_text: str | None
                             ) -> StructuredOutputsParams | None:
    """The constraint for the engine: starting after the thinking when the answer begins in
    it, and compiled here first (a 400 if it is malformed or too slow to compile)."""
    constraint = plan.constraint
    if constraint is None and plan.auto_tool_schemas is not None:
        # Free text, and the tools' schemas once a call starts; from the first token, so a
        # call written inside a thinking block is held to its schema too.
        return await _auto_call_constraint(plan, engine)
    if constraint is None:
        return None
    await check_constraint(engine, constraint, plan.constraint_param or "structured_outputs")
    # Only a thinking block the prompt leaves open delays it: where the answer might or might
    # not open one (Qwen3 hybrid), the constraint holds from the first token, so an answer is
    # never left unconstrained by a block that never came.
    if plan.reasoning_parser and starts_in_reasoning(plan.reasoning_parser, prompt_text):
        end_ids = engine.tokenizer.encode("</think>", add_special_tokens=False)
        constraint.reasoning_end_token_ids = list(end_ids)
    return constraint


async def _auto_call_constraint(plan: ChatPlan, engine: Any) -> StructuredOutputsParams | None:
    assert plan.tools is not None and plan.tools.parser and plan.auto_tool_schemas is not None
    loop = asyncio.get_running_loop()
    compiler = await loop.run_in_executor(None, grammar_compiler, engine)
    lookup = special_token_lookup(engine.tokenizer, compiler.ll_tokenizer)
    grammar = auto_call_grammar(plan.tools.parser, plan.auto_tool_schemas, plan.tools.parallel,
                                lookup)
    if grammar is None:
        return None  # a syntax that is not JSON (pythonic): parsed, not constrained
    constraint = StructuredOutputsParams(grammar=grammar)
    await check_constraint(engine, constraint, "tools")
    return constraint


def template_message_tool_fields(message: Any, index: int) -> dict:
    """A history message's tool fields as chat templates read them (arguments as a dict, as
    Qwen's and Llama's templates expect)."""
    entry: dict = {}
    if message.tool_calls:
        calls = []
        for j, call in enumerate(message.tool_calls):
            try:
                arguments = json.loads(call.function.arguments or "{}")
            except json.JSONDecodeError as exc:
                raise bad_request(
                    f"messages.{index}.tool_calls.{j}.function.arguments is not JSON: {exc}",
                    f"messages.{index}.tool_calls.{j}.function.arguments") from exc
            calls.append({"id": call.id, "type": "function",
                          "function": {"name": call.function.name, "arguments": arguments}})
        entry["tool_calls"] = calls
    if message.tool_call_id is not None:
        entry["tool_call_id"] = message.tool_call_id
    if message.reasoning_content:
        entry["reasoning_content"] = message.reasoning_content
    return entry


def _parameters(schema: dict | None) -> dict:
    return schema if schema else {"type": "object", "properties": {}}


def _calls_schema(tool_schemas: dict[str, dict], parallel: bool) -> dict:
    """JSON schema of `tool_choice: required`: an array of {"name", "parameters"} (vLLM's)."""
    one_call = {"anyOf": [
        {"type": "object",
         "properties": {"name": {"type": "string", "enum": [name]}, "parameters": schema},
         "required": ["name", "parameters"], "additionalProperties": False}
        for name, schema in tool_schemas.items()]}
    schema: dict = {"type": "array", "items": one_call, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema
