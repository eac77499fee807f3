"""Command-line flags generated from configuration dataclasses (issue 18, item 7).

A setting's default, type, allowed values and help are written once, on the dataclass field
(`flag(...)`); `add_flags` turns the fields into argparse flags (`block_size` becomes
`--block-size`, with a prefix `--kv-` for the warehouse's), and `from_flags` builds the
dataclass back from the parsed flags. The dataclass is also what `LLM(**kw)` and tests build
directly, so the command line and the Python API cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

_MISSING = dataclasses.MISSING


class HelpFormatter(argparse.HelpFormatter):
    """Appends each flag's default to its help, unless the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "default" in text
            or action.default is None
            or action.default is False  # a switch that is off unless given
            or action.default == argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


def flag(
    default: Any = _MISSING,
    help: str = "",
    *,
    choices: typing.Sequence[Any] | None = None,
    type: Callable[[str], Any] | None = None,
    parse: Callable[[str, str], Any] | None = None,
    name: str | None = None,
    aliases: tuple[str, ...] = (),
    metavar: str | None = None,
    nargs: str | None = None,
    action: str | None = None,
    positional: bool = False,
    default_factory: Callable[[], Any] | Any = _MISSING,
) -> Any:
    """A dataclass field that is also a command-line flag.

    `type` converts the flag's text (default: the field's annotated type); `parse(text, flag)`
    does the same with the flag's name at hand for its error message. `name` replaces the flag
    derived from the field's name; `aliases` adds short forms (`-q`).
    """
    metadata = {"help": help, "choices": choices, "type": type, "parse": parse, "name": name,
                "aliases": aliases, "metavar": metavar, "nargs": nargs, "action": action,
                "positional": positional}  # fmt: skip
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"flag": metadata})
    return dataclasses.field(default=default, metadata={"flag": metadata})


def flag_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of dataclass `cls` declared with `flag(...)`, in declaration order."""
    return [f for f in dataclasses.fields(cls) if "flag" in f.metadata]


def option_name(field: dataclasses.Field, prefix: str = "") -> str:
    """The flag of `field`: `--{prefix}{name-with-dashes}` unless the field names its own."""
    return field.metadata["flag"]["name"] or f"--{prefix}{field.name.replace('_', '-')}"


def dest(field: dataclasses.Field, prefix: str = "") -> str:
    """The attribute of the parsed namespace that holds `field`'s value."""
    meta = field.metadata["flag"]
    if meta["positional"]:
        return field.name
    return option_name(field, prefix).lstrip("-").replace("-", "_")


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    prefix: str = "",
    skip: typing.Collection[str] = (),
    only: typing.Collection[str] | None = None,
) -> None:
    """Add one flag per `flag(...)` field of dataclass `cls` (those named in `only`, if given,
    except those in `skip`)."""
    hints = typing.get_type_hints(cls)
    for field in flag_fields(cls):
        if field.name in skip or (only is not None and field.name not in only):
            continue
        meta = field.metadata["flag"]
        kwargs: dict[str, Any] = {"help": meta["help"], "default": _default(field)}
        value_type = _scalar_type(hints[field.name])
        if meta["action"] is not None:
            kwargs["action"] = meta["action"]
        elif value_type is bool:
            # A switch that is off unless given; one that is on (or decided later) can be
            # turned either way (--x / --no-x), as vLLM's.
            kwargs["action"] = (
                "store_true" if kwargs["default"] is False else argparse.BooleanOptionalAction
            )
        else:
            kwargs["type"] = _converter(meta, value_type, option_name(field, prefix))
        for key in ("choices", "metavar", "nargs"):
            if meta[key] is not None:
                kwargs[key] = meta[key]
        if meta["positional"]:
            parser.add_argument(field.name, nargs="?", **kwargs)
        else:
            names = [option_name(field, prefix), *meta["aliases"]]
            parser.add_argument(*names, dest=dest(field, prefix), **kwargs)


def from_flags(cls: type, args: argparse.Namespace, *, prefix: str = "", **values: Any) -> Any:
    """An instance of `cls` from the parsed flags its fields declared; `values` add or replace
    fields (those that are not flags, such as a nested config)."""
    parsed = {f.name: getattr(args, dest(f, prefix)) for f in flag_fields(cls)
              if hasattr(args, dest(f, prefix))}  # fmt: skip
    return cls(**(parsed | values))


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not _MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return None if field.default is _MISSING else field.default


def _scalar_type(hint: Any) -> Any:
    """`int | None` -> int; a list hint -> its item type; anything else (object) -> str."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else str
    if typing.get_origin(hint) is list:
        hint = typing.get_args(hint)[0]
    return hint if hint in (int, float, str, bool) else str


def _converter(meta: dict, value_type: Any, option: str) -> Callable[[str], Any]:
    if meta["parse"] is not None:
        parse = meta["parse"]

        def convert(text: str) -> Any:
            try:
                return parse(text, option)
            except ValueError as exc:  # our message names the flag and its range
                raise argparse.ArgumentTypeError(str(exc)) from None

        convert.__name__ = option
        return convert
    return meta["type"] or value_type
