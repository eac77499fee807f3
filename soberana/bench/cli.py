"""`soberana bench`: load-test any OpenAI-compatible endpoint; `soberana bench compare A B`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable

from soberana.bench.config import (
    ENDPOINTS,
    BenchConfig,
    BenchConfigError,
    LoadPoint,
    Target,
    WorkloadConfig,
    default_metrics_url,
    normalize_base_url,
    parse_count,
    parse_positive_float,
    parse_sweep,
)
from soberana.config_file import add_config_flag
from soberana.config_flags import HelpFormatter, add_flags, from_flags


class _HelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults appended to the flags' help; the epilog's examples kept on their own lines."""


def _typed(parse: Callable, name: str, **kwargs) -> Callable[[str], object]:
    """An argparse `type=` that reports our own message (it names the argument and the range)."""

    def convert(text: str) -> object:
        try:
            return parse(text, name, **kwargs)
        except BenchConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name  # argparse shows it in "invalid <name> value" messages
    return convert


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `soberana bench` options and the `compare` sub-mode."""
    parser.formatter_class = _HelpFormatter
    add_config_flag(parser)
    parser.epilog = (
        "example: soberana bench --base-url http://127.0.0.1:8000/v1 --num-prompts 100 "
        "--concurrency 10 --output-dir out/\n"
        "compare: soberana bench compare out_a/summary.json out_b/summary.json"
    )
    t = parser.add_argument_group("target")
    t.add_argument(
        "--base-url",
        metavar="URL",
        default="http://127.0.0.1:8000/v1",
        help="OpenAI base URL (default %(default)s; a bare host gets /v1)",
    )
    t.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get("OPENAI_API_KEY"),
        help="bearer token (default: $OPENAI_API_KEY)",
    )
    t.add_argument("--model", help="model name to request (default: the first of GET /v1/models)")
    t.add_argument(
        "--endpoint",
        choices=ENDPOINTS,
        default="completions",
        help="/v1/completions (exact prompt lengths) or /v1/chat/completions",
    )
    t.add_argument(
        "--extra-body",
        default="{}",
        metavar="JSON",
        help="fields added to every request body, e.g. '{\"temperature\": 0}'",
    )
    t.add_argument(
        "--ignore-eos",
        action="store_true",
        help="ask the server to generate exactly max_tokens (vLLM/Soberana extra)",
    )
    add_flags(t, BenchConfig, only=("tokenizer",))
    t.add_argument(
        "--timeout",
        type=_typed(parse_positive_float, "--timeout"),
        default=600.0,
        metavar="S",
        help="per-request timeout in seconds (default %(default)s)",
    )
    t.add_argument(
        "--metrics-url",
        metavar="URL",
        help="Prometheus metrics URL (default: /metrics on the host)",
    )
    t.add_argument("--no-server-metrics", action="store_true", help="do not read /metrics")

    add_flags(parser.add_argument_group("workload"), WorkloadConfig)

    ld = parser.add_argument_group("load")
    ld.add_argument(
        "--concurrency",
        type=_typed(parse_count, "--concurrency"),
        metavar="C",
        help="closed loop of C users (default 1); with --request-rate, the in-flight cap",
    )
    ld.add_argument(
        "--request-rate",
        type=_typed(parse_positive_float, "--request-rate", allow_inf=True),
        metavar="R",
        help="open loop: R requests/s on average (inf: all at once)",
    )
    ld.add_argument(
        "--burstiness",
        type=_typed(parse_positive_float, "--burstiness"),
        default=1.0,
        metavar="B",
        help="gamma shape of inter-arrival times: 1 Poisson, <1 burstier, >1 steadier",
    )
    add_flags(ld, BenchConfig, only=("num_prompts", "duration_s", "warmup", "seed"))
    ld.add_argument(
        "--sweep",
        metavar="concurrency=C1,C2|rate=R1,R2",
        help="one run per value; plots latency and throughput against load",
    )

    add_flags(parser.add_argument_group("report"), BenchConfig,
              only=("percentiles", "slo", "output_dir", "progress"))  # fmt: skip

    modes = parser.add_subparsers(dest="bench_mode", metavar="compare")
    cmp = modes.add_parser(
        "compare",
        help="compare two summary.json files side by side",
        description="Print two summary.json files side by side with B/A ratios.",
    )
    cmp.add_argument("a", metavar="A.json")
    cmp.add_argument("b", metavar="B.json")


def config_from_args(args: argparse.Namespace, argv: list[str]) -> BenchConfig:
    """Check the options together and build the run's configuration."""
    try:
        extra_body = json.loads(args.extra_body)
    except json.JSONDecodeError as exc:
        raise BenchConfigError(f"--extra-body must be a JSON object: {exc}") from None
    if not isinstance(extra_body, dict):
        raise BenchConfigError("--extra-body must be a JSON object, e.g. '{\"temperature\": 0}'")
    if args.ignore_eos:
        extra_body["ignore_eos"] = True
    base_url = normalize_base_url(args.base_url)
    metrics_url = (
        None if args.no_server_metrics else (args.metrics_url or default_metrics_url(base_url))
    )
    target = Target(
        base_url, args.endpoint, args.model, args.api_key, extra_body, metrics_url, args.timeout
    )
    if args.workload == "file" and not args.dataset_path:
        raise BenchConfigError("--workload file needs --dataset-path FILE.jsonl")
    workload = from_flags(WorkloadConfig, args)
    if args.request_rate is None and args.burstiness != 1.0:
        raise BenchConfigError("--burstiness shapes open-loop arrivals: it needs --request-rate")
    base = LoadPoint(args.concurrency, args.request_rate, args.burstiness)
    if args.sweep:
        loads = parse_sweep(args.sweep, base)
        if loads[0].mode == "closed" and args.request_rate is not None:
            raise BenchConfigError("--sweep concurrency=... runs closed loops: drop --request-rate")
    elif base.mode == "closed":
        loads = [LoadPoint(args.concurrency or 1)]
    else:
        loads = [base]
    if (
        args.duration is not None
        and args.num_prompts is None
        and any(p.request_rate == float("inf") for p in loads)
    ):
        raise BenchConfigError(
            "--request-rate inf with --duration starts requests without limit: add --num-prompts"
        )
    return from_flags(BenchConfig, args, target=target, workload=workload, loads=loads,
                      command_line=_redacted(argv))  # fmt: skip


def _redacted(argv: list[str]) -> list[str]:
    """argv without the API key's value (summary.json is meant to be shared)."""
    out, hide = [], False
    for arg in argv:
        if hide:
            out.append("<redacted>")
        elif arg.startswith("--api-key="):
            arg = "--api-key=<redacted>"
            out.append(arg)
        else:
            out.append(arg)
        hide = arg == "--api-key"
    return out


def run(args: argparse.Namespace) -> int:
    """Run the benchmark or `compare`: 0 on success, 1 if nothing succeeded, 2 on bad input."""
    if args.bench_mode == "compare":
        from soberana.bench.compare import run_compare

        return run_compare(args.a, args.b)
    from soberana.bench.client import TargetUnavailable
    from soberana.bench.report import format_run, format_sweep
    from soberana.bench.runner import run_benchmark, write_outputs

    # Recorded in summary.json; `soberana` whether started as a script or `python -m soberana.cli`.
    argv = ["soberana", *sys.argv[1:]]
    try:
        cfg = config_from_args(args, argv)
        outcome = asyncio.run(run_benchmark(cfg))
    except BenchConfigError as exc:
        print(f"soberana bench: error: {exc}", file=sys.stderr)
        return 2
    except TargetUnavailable as exc:
        print(f"soberana bench: error: {exc}", file=sys.stderr)
        return 1
    runs = outcome.summary["runs"]
    for run_summary in runs:
        print(format_run(run_summary, cfg.percentiles))
    if len(runs) > 1:
        print(format_sweep(runs, cfg.percentiles))
    if cfg.output_dir:
        for path in write_outputs(cfg, outcome):
            print(f"wrote {path}")
    if not any(r["requests"]["completed"] for r in runs):
        first = next((r for _, results in outcome.results for r in results if not r.ok), None)
        detail = f" (first error: {first.error_type}: {first.error_message[:300]})" if first else ""
        print(f"soberana bench: error: no request succeeded{detail}", file=sys.stderr)
        return 1
    return 0
