"""`soberana gateway`: arguments and entry point."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from pathlib import Path

from soberana.config_flags import HelpFormatter, add_flags, from_flags
from soberana.gateway.config import GatewayConfig
from soberana.gateway.config_loader import ConfigError, load_config
from soberana.gateway.exposure import onprem_exposures
from soberana.gateway.tenants import hash_key
from soberana.log import LoggingConfig
from soberana.tracing import from_endpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register `soberana gateway`'s options."""
    parser.formatter_class = HelpFormatter
    parser.add_argument("--config", type=Path, help="gateway.yaml: models, backends and tenants")
    parser.add_argument("--host", help="address to listen on (default: server.host or 127.0.0.1)")
    parser.add_argument(
        "--port",
        type=int,
        help="port to listen on; 0 picks a free one (default: server.port or 8080)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the config and exit: 0 if valid, 1 if valid but an `onprem` backend's "
        "endpoint is not loopback or a private address, 2 if invalid",
    )
    parser.add_argument(
        "--hash-key",
        action="store_true",
        help="read an API key from stdin and print the sha256 digest to put under key_sha256",
    )
    parser.add_argument(
        "--otlp-traces-endpoint", default=None,
        help="send a span per request over OTLP/HTTP to this collector URL "
        "(e.g. http://localhost:4318); W3C traceparent is forwarded to backends either way",
    )
    add_flags(parser, LoggingConfig)
    # The gateway logs what an operator acts on: backends going down and up, reloads.
    parser.set_defaults(log_level="warning")


def run(args: argparse.Namespace) -> int:
    """Validate the config, then serve until SIGTERM."""
    if args.hash_key:
        key = getpass.getpass("API key: ") if sys.stdin.isatty() else sys.stdin.readline()
        key = key.strip()
        if not key:
            print("error: no key given on stdin", file=sys.stderr)
            return 2
        print(hash_key(key))
        return 0
    if args.config is None:
        print("error: --config is required", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"error: invalid gateway config: {e}", file=sys.stderr)
        return 2
    if args.check:
        return _check(args.config, config)
    from_flags(LoggingConfig, args).configure()
    from soberana.gateway.server import GatewayServer

    host = args.host or config.host
    port = config.port if args.port is None else args.port
    try:
        tracing = from_endpoint("soberana-gateway", args.otlp_traces_endpoint)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server = GatewayServer(args.config, config, host, port, tracing)
    try:
        _event_loop_runner()(server.run())
    except OSError as e:  # the address is taken, or not ours to bind
        print(f"error: cannot listen on {host}:{port}: {e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        if tracing is not None:
            tracing.shutdown()
    return 0


def _check(path: Path, config: GatewayConfig) -> int:
    """Print the verdict of `--check`; privacy exposures are reported as warnings (exit 1)."""
    exposures = onprem_exposures(config)
    for line in exposures:
        print(f"warning: {path}: {line}", file=sys.stderr)
    backends = sum(len(m.backends) for m in config.models.values())
    counts = f"{len(config.models)} models, {backends} backends, {len(config.tenants)} tenants"
    if exposures:
        print(f"{path}: valid, with {len(exposures)} privacy warning(s) ({counts})")
        return 1
    print(f"{path}: OK ({counts})")
    return 0


def _event_loop_runner():
    # uvloop roughly halves the gateway's per-request overhead; it is not built for Windows.
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run
