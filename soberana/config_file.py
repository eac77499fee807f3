"""`--config FILE.yaml` (vLLM's): a YAML mapping whose keys are a command's flag names.

Keys may be written with `-` or `_` (`max-num-seqs` or `max_num_seqs`); a flag also given on
the command line wins over the file; a key that is no flag of the command is an error naming
it. The file is turned into command-line arguments, so its values are checked exactly as the
flags' are.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

CONFIG_FLAG = "--config"


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    """Declare `--config FILE.yaml` on `parser` (read by `expand_config_file` before parsing)."""
    parser.add_argument(
        CONFIG_FLAG,
        metavar="FILE.yaml",
        default=None,
        help="read flags from a YAML mapping (keys: flag names, with - or _; e.g. "
        "'max-num-seqs: 64'); flags given on the command line override the file",
    )
    parser.set_defaults(_flags_file=True)


def declares_config_flag(parser: argparse.ArgumentParser) -> bool:
    """Whether `parser`'s --config is a file of flags (the gateway's names its gateway.yaml)."""
    return bool(parser.get_default("_flags_file"))


def expand_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`argv` (the command's own arguments) with `--config FILE`'s settings added as flags.

    Exits through `parser.error` (status 2) on an unreadable file or an unknown key.
    """
    path, argv = _take_config_path(parser, argv)
    if path is None:
        return argv
    settings = _read(parser, path)
    by_option = {opt: a for a in parser._actions for opt in a.option_strings}
    positionals = {a.dest: a for a in parser._actions if not a.option_strings}
    added: list[str] = []
    for key, value in settings.items():
        option = "--" + str(key).replace("_", "-")
        action = by_option.get(option)
        if action is None and str(key).replace("-", "_") in positionals:
            # A positional (soberana serve's MODEL): one given on the command line wins.
            parser.set_defaults(**{str(key).replace("-", "_"): value})
            continue
        if action is None or option == CONFIG_FLAG or isinstance(action, argparse._HelpAction):
            parser.error(f"{CONFIG_FLAG} {path}: unknown key {key!r} (no flag {option} in "
                         f"`{parser.prog}`; see --help)")  # fmt: skip
        if value is None or _given(action, argv):  # null: the flag's default
            continue
        added += _as_arguments(parser, path, key, option, action, value)
    # Appended after the command line: values of a multi-value flag there cannot swallow them.
    return [*argv, *added]


def _take_config_path(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[str | None, list[str]]:
    rest: list[str] = []
    path = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest += argv[i:]
            break
        if arg == CONFIG_FLAG:
            if i + 1 >= len(argv):
                parser.error(f"{CONFIG_FLAG} needs a FILE.yaml")
            path = argv[i + 1]
            i += 2
            continue
        if arg.startswith(CONFIG_FLAG + "="):
            path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return path, rest


def _read(parser: argparse.ArgumentParser, path: str) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        parser.error(f"{CONFIG_FLAG} {path}: cannot read it: {exc.strerror}")
    except yaml.YAMLError as exc:
        parser.error(f"{CONFIG_FLAG} {path}: not valid YAML: {exc}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        parser.error(f"{CONFIG_FLAG} {path}: must be a mapping of flag names to values; got "
                     f"{type(data).__name__}")  # fmt: skip
    return data


def _given(action: argparse.Action, argv: list[str]) -> bool:
    """Whether the command line sets this flag (any spelling, `--x=v` and `--no-x` too)."""
    options = list(action.option_strings)
    for arg in argv:
        if arg in options or any(arg.startswith(o + "=") for o in options if o.startswith("--")):
            return True
    return False


def _as_arguments(
    parser: argparse.ArgumentParser, path: str, key: Any, option: str, action: argparse.Action,
    value: Any,
) -> list[str]:
    if isinstance(action, argparse.BooleanOptionalAction) or action.nargs == 0:
        if not isinstance(value, bool):
            parser.error(f"{CONFIG_FLAG} {path}: {key!r} is a switch: true or false; got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return [option if value else "--no-" + option[2:]]
        # store_true: true turns it on; false is its default
        return [option] if value == bool(action.const) else []
    if isinstance(action, argparse._AppendAction):
        values = value if isinstance(value, list) else [value]
        return [arg for v in values for arg in (option, _text(v))]
    if action.nargs in ("+", "*"):
        values = value if isinstance(value, list) else [value]
        return [option, *(_text(v) for v in values)]
    return [option, _text(value)]


def _text(value: Any) -> str:
    # A mapping or list value (e.g. speculative-config) is the flag's JSON form.
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
