"""Command-line flags of tools, reasoning and structured outputs (vLLM's names)."""

from __future__ import annotations

import argparse

from soberana.server.agent_request import AgentOptions
from soberana.server.reasoning_parsers import REASONING_PARSERS
from soberana.server.tool_parsers import TOOL_PARSERS
from soberana.structured.compiler import DEFAULT_COMPILE_TIMEOUT_S


def add_agent_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tools, reasoning and structured outputs")
    group.add_argument(
        "--tool-call-parser", default="auto",
        help=f"how the model writes tool calls: auto (from the chat template), none, or one "
             f"of {', '.join(sorted(TOOL_PARSERS))}",
    )
    group.add_argument(
        "--reasoning-parser", default=None, choices=REASONING_PARSERS,
        help="put the model's thinking into reasoning_content",
    )
    group.add_argument(
        "--structured-outputs-timeout", type=float, default=DEFAULT_COMPILE_TIMEOUT_S,
        help="seconds a grammar may take to compile before the request gets a 400",
    )


def agent_options_from_args(args: argparse.Namespace) -> AgentOptions:
    parser = None if args.tool_call_parser == "none" else args.tool_call_parser
    return AgentOptions(parser, args.reasoning_parser, args.structured_outputs_timeout)
