"""`soberana` command line: each subcommand's arguments and logic live in its own package."""

from __future__ import annotations

import argparse
import importlib
import sys

from soberana.config_file import declares_config_flag, expand_config_file

# subcommand -> module exposing add_arguments(parser) and run(args) -> int
# (and the pyproject extra that installs what it needs: `pip install 'soberana[EXTRA]'`)
_EXTRAS = {"serve": "serve", "bench": "bench", "gateway": "gateway", "telemetry": "telemetry",
           "demo-model": "serve", "kv": "redis", "audit": "gateway"}  # fmt: skip
_SUBCOMMANDS = {
    "serve": ("soberana.server.cli", "run the OpenAI-compatible server"),
    "bench": ("soberana.bench.cli", "benchmark any OpenAI-compatible endpoint"),
    "gateway": ("soberana.gateway.cli", "run the gateway over a fleet of backends"),
    "telemetry": ("soberana.telemetry.cli", "export GPU telemetry (DCGM names) on /metrics"),
    "demo-model": ("soberana.models.demo", "build (or locate) the built-in demo model"),
    "kv": ("soberana.kv.cli", "manage the KV warehouse's shared tiers (purge a tenant)"),
    "audit": ("soberana.gateway.privacy.audit_cli", "verify the gateway's hash-chained audit log"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="soberana", description="Soberana inference stack")
    from soberana import __version__

    parser.add_argument("--version", action="version", version=f"soberana {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = argv[0] if argv and argv[0] in _SUBCOMMANDS else None
    for name, (module_name, help_text) in _SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        # Import only the chosen subcommand: `soberana bench` must not load torch.
        if name == chosen:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:  # installed without this command's extra
                print(f"soberana {name} needs {exc.name!r}, which is not installed: "
                      f"pip install 'soberana[{_EXTRAS[name]}]'", file=sys.stderr)
                return 1
            module.add_arguments(sp)
            sp.set_defaults(_run=module.run, _argv=["soberana", *argv])
            if declares_config_flag(sp):  # vLLM's --config FILE.yaml of flags
                argv = [name, *expand_config_file(sp, argv[1:])]
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
