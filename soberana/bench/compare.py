"""`soberana bench compare A.json B.json`: two summaries side by side, with B/A ratios."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

from soberana.bench.schema import validate_summary

_LATENCIES = (
    ("ttft", "TTFT"),
    ("tpot", "TPOT"),
    ("itl", "ITL"),
    ("e2e", "E2E"),
    ("queue_time", "Queue"),
)


def load_summary(path: str) -> dict:
    """Read and validate one summary.json; ValueError says what is wrong with it."""
    import jsonschema

    try:
        summary = json.loads(Path(path).read_text(encoding="utf-8"))
        validate_summary(summary)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON: {exc}") from None
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise ValueError(
            f"{path}: not a soberana bench summary.json: at {where}: {exc.message}"
        ) from None
    return summary


def _rows(
    a: dict, b: dict, percentiles: list[float]
) -> Iterator[tuple[str, float | None, float | None]]:
    """(metric, value in A, value in B) for one pair of runs."""
    yield "requests completed", a["requests"]["completed"], b["requests"]["completed"]
    yield "requests failed", a["requests"]["failed"], b["requests"]["failed"]
    for key, label in (
        ("requests_per_s", "throughput (req/s)"),
        ("output_tokens_per_s", "output tokens/s"),
        ("total_tokens_per_s", "total tokens/s"),
    ):
        yield label, a["throughput"][key], b["throughput"][key]
    if a["goodput"] or b["goodput"]:
        yield (
            "goodput (req/s)",
            (a["goodput"] or {}).get("requests_per_s"),
            (b["goodput"] or {}).get("requests_per_s"),
        )
    for name, label in _LATENCIES:
        sa, sb = a["latency_ms"][name], b["latency_ms"][name]
        if sa is None and sb is None:
            continue
        for stat in ["mean"] + [f"p{p:g}" for p in percentiles]:
            yield f"{label} {stat} (ms)", (sa or {}).get(stat), (sb or {}).get(stat)
    ma, mb = a["server_metrics"] or {}, b["server_metrics"] or {}
    for key, label in (
        ("prefix_cache_hit_rate", "prefix-cache hit rate"),
        ("kv_cache_usage_peak", "KV usage peak"),
    ):
        if ma.get(key) is not None or mb.get(key) is not None:
            yield label, ma.get(key), mb.get(key)


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or a == 0:
        return "-"
    return f"{b / a:.3f}x"


def _describe(summary: dict) -> str:
    t, w = summary["target"], summary["workload"]
    target = f"{t['model']} @ {t['base_url']} ({t['endpoint']})"
    return f"{target}, workload {w['name']}, {summary['started_at']}"


def _load(run: dict) -> str:
    load = run["load"]
    if load["mode"] == "closed":
        return f"concurrency {load['concurrency']}"
    return f"rate {load['request_rate']} req/s"


def format_comparison(a: dict, b: dict, name_a: str = "A", name_b: str = "B") -> str:
    """The comparison table; runs are paired in order (sweep point by sweep point)."""
    pa = a["settings"]["percentiles"]
    percentiles = [p for p in pa if p in b["settings"]["percentiles"]]
    lines = [f"A: {name_a}: {_describe(a)}", f"B: {name_b}: {_describe(b)}"]
    if len(a["runs"]) != len(b["runs"]):
        lines.append(
            f"note: A has {len(a['runs'])} runs and B {len(b['runs'])}; "
            "comparing the first runs of each in order"
        )
    for ra, rb in zip(a["runs"], b["runs"], strict=False):
        lines.append("")
        lines.append(f"{'':=<78}")
        lines.append(f"{'A: ' + _load(ra) + '  |  B: ' + _load(rb):^78}")
        lines.append(f"{'metric':<28}{'A':>16}{'B':>16}{'B/A':>12}")
        for label, va, vb in _rows(ra, rb, percentiles):
            lines.append(f"{label:<28}{_cell(va):>16}{_cell(vb):>16}{_ratio(va, vb):>12}")
    return "\n".join(lines)


def run_compare(path_a: str, path_b: str) -> int:
    """Print the comparison of two summary.json files; 2 if either is not one."""
    try:
        a, b = load_summary(path_a), load_summary(path_b)
    except ValueError as exc:
        print(f"soberana bench compare: error: {exc}", file=sys.stderr)
        return 2
    print(format_comparison(a, b, path_a, path_b))
    return 0
