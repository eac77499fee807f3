"""What a run leaves behind: terminal tables, requests.csv and summary.json."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from soberana.bench.request import RequestResult
from soberana.bench.schema import validate_summary
from soberana.bench.stats import percentile_key

CSV_COLUMNS = [
    "run",
    "load",
    "request_id",
    "user",
    "turn",
    "prefix",
    "start_s",
    "status",
    "error_type",
    "ttft_ms",
    "tpot_ms",
    "e2e_ms",
    "queue_time_ms",
    "itl_ms",
    "prompt_tokens",
    "target_prompt_tokens",
    "output_tokens",
    "max_tokens",
    "cached_tokens",
    "token_source",
    "finish_reason",
    "error_message",
]
_LATENCY_ROWS = (
    ("ttft", "TTFT"),
    ("tpot", "TPOT"),
    ("itl", "ITL"),
    ("e2e", "E2E"),
    ("queue_time", "Queue"),
)


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1000.0:.3f}"


def write_requests_csv(path: Path, runs: Sequence[tuple[str, Sequence[RequestResult]]]) -> None:
    """One row per request of every run, in the order they were sent; latencies in ms."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for run_index, (label, results) in enumerate(runs):
            for r in sorted(results, key=lambda r: r.start_s):
                s = r.spec
                writer.writerow(
                    [
                        run_index,
                        label,
                        s.request_id,
                        s.user,
                        s.turn,
                        s.prefix,
                        f"{r.start_s:.6f}",
                        r.status,
                        r.error_type or "",
                        _ms(r.ttft_s),
                        _ms(r.tpot_s),
                        _ms(r.e2e_s),
                        _ms(r.queue_time_s),
                        ";".join(f"{g * 1000.0:.3f}" for g in r.itl_s),
                        r.prompt_tokens,
                        s.target_prompt_tokens,
                        r.output_tokens,
                        s.max_tokens,
                        r.cached_tokens,
                        r.token_source,
                        r.finish_reason or "",
                        r.error_message,
                    ]
                )


def write_summary(path: Path, summary: dict) -> None:
    """Validate `summary` against the schema, then write it as JSON."""
    validate_summary(summary)
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def format_run(run: dict, percentiles: Sequence[float]) -> str:
    """One run as a terminal report: counts, throughput, latency table, server metrics."""
    req, tok, thr = run["requests"], run["tokens"], run["throughput"]
    load = run["load"]
    if load["mode"] == "closed":
        title = f"closed loop, concurrency {load['concurrency']}"
    else:
        title = f"open loop, {load['request_rate']} req/s, burstiness {load['burstiness']:g}"
        if load["concurrency"]:
            title += f", at most {load['concurrency']} in flight"
    errors = ", ".join(f"{k}: {v}" for k, v in req["errors"].items())
    lines = [
        f"{' ' + title + ' ':=^78}",
        f"Requests     {req['sent']} sent, {req['completed']} completed, {req['failed']} failed"
        + (f" ({errors})" if errors else ""),
        f"Duration     {run['duration_s']:.2f} s (client CPU {run['client_cpu_s']:.2f} s)",
        f"Throughput   {thr['requests_per_s']:.2f} req/s, {thr['output_tokens_per_s']:.1f} output "
        f"tok/s, {thr['total_tokens_per_s']:.1f} total tok/s",
        f"Tokens       {tok['prompt']} prompt, {tok['output']} output"
        + (
            f", {tok['cached_prompt']} prompt tokens cached"
            if tok["cached_prompt"] is not None
            else ""
        )
        + (
            " (counted by: " + ", ".join(f"{k} {v}" for k, v in tok["sources"].items()) + ")"
            if tok["sources"]
            else ""
        ),
    ]
    if run["goodput"]:
        g = run["goodput"]
        slo = ", ".join(f"{k}<={v:g}ms" for k, v in g["slo_ms"].items())
        lines.append(
            f"Goodput      {g['requests_per_s']:.2f} req/s, {g['good_requests']} requests "
            f"({_pct(g['fraction'])}) within {slo}"
        )
    keys = ["mean"] + [percentile_key(p) for p in percentiles]
    lines.append("")
    lines.append(f"{'Latency (ms)':<14}" + "".join(f"{k:>11}" for k in keys) + f"{'count':>9}")
    for name, label in _LATENCY_ROWS:
        stats = run["latency_ms"][name]
        if stats is None:
            if name != "queue_time":  # most servers do not report queue time: no empty row
                lines.append(f"{label:<14}" + "".join(f"{'-':>11}" for _ in keys) + f"{0:>9}")
            continue
        lines.append(
            f"{label:<14}" + "".join(f"{stats[k]:>11.2f}" for k in keys) + f"{stats['count']:>9}"
        )
    server = run["server_metrics"]
    if server:
        lines.append("")
        kv = (
            f"KV usage peak {_pct(server['kv_cache_usage_peak'])} "
            f"(before {_pct(server['kv_cache_usage_before'])}, "
            f"after {_pct(server['kv_cache_usage_after'])})"
        )
        lines.append(
            f"Server       prefix-cache hit rate {_pct(server['prefix_cache_hit_rate'])}, {kv}, "
            f"mean queue {_fmt(server['mean_queue_time_ms'])} ms, "
            f"preemptions {_fmt(server['num_preemptions'], '.0f')}"
        )
    return "\n".join(lines)


def _load_label(load: dict) -> str:
    if load["mode"] == "closed":
        return f"c={load['concurrency']}"
    return f"r={load['request_rate']}"


def format_sweep(runs: Sequence[dict], percentiles: Sequence[float]) -> str:
    """One line per load point: throughput, median and tail TTFT/TPOT, errors."""
    tail = percentile_key(max(percentiles))
    mid = percentile_key(50.0) if 50.0 in percentiles else percentile_key(min(percentiles))
    head = [
        "load",
        "req/s",
        "out tok/s",
        f"TTFT {mid}",
        f"TTFT {tail}",
        f"TPOT {mid}",
        f"TPOT {tail}",
        "failed",
    ]
    lines = [f"{' sweep ':=^78}", "".join(f"{h:>11}" for h in head)]
    for run in runs:
        ttft, tpot = run["latency_ms"]["ttft"] or {}, run["latency_ms"]["tpot"] or {}
        row = [
            _load_label(run["load"]),
            f"{run['throughput']['requests_per_s']:.2f}",
            f"{run['throughput']['output_tokens_per_s']:.1f}",
            _fmt(ttft.get(mid)),
            _fmt(ttft.get(tail)),
            _fmt(tpot.get(mid)),
            _fmt(tpot.get(tail)),
            str(run["requests"]["failed"]),
        ]
        lines.append("".join(f"{c:>11}" for c in row))
    return "\n".join(lines)
