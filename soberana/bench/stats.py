"""Summary statistics of one run: latency percentiles, throughput, goodput and errors."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from soberana.bench.request import RequestResult

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2e", "queue_time")


def percentile_key(p: float) -> str:
    """`50.0` -> `p50`, `99.9` -> `p99.9` (the key used in summary.json)."""
    return f"p{p:g}"


def describe(values_s: Sequence[float], percentiles: Sequence[float]) -> dict | None:
    """count, mean, std, min, max and the percentiles of `values_s`, in milliseconds.

    Percentiles interpolate linearly between order statistics (numpy's default), so the p50
    of 1..100 is 50.5. None when there are no values.
    """
    if not values_s:
        return None
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    out = {
        "count": int(ms.size),
        "mean": float(ms.mean()),
        "std": float(ms.std()),
        "min": float(ms.min()),
        "max": float(ms.max()),
    }
    for p, v in zip(percentiles, np.percentile(ms, list(percentiles)), strict=True):
        out[percentile_key(p)] = float(v)
    return out


def latency_samples(results: Sequence[RequestResult]) -> dict[str, list[float]]:
    """Seconds per latency metric over the successful requests (ITL: every gap of every one)."""
    ok = [r for r in results if r.ok]
    return {
        "ttft": [r.ttft_s for r in ok if r.ttft_s is not None],
        "tpot": [t for r in ok if (t := r.tpot_s) is not None],
        "itl": [gap for r in ok for gap in r.itl_s],
        "e2e": [r.e2e_s for r in ok if r.e2e_s is not None],
        "queue_time": [r.queue_time_s for r in ok if r.queue_time_s is not None],
    }


def meets_slo(result: RequestResult, slo_ms: dict[str, float]) -> bool:
    """True when `result` succeeded within every given limit (ms).

    A one-token answer has no TPOT and passes that limit; an answer with no token fails TTFT.
    """
    if not result.ok:
        return False
    observed = {"ttft": result.ttft_s, "tpot": result.tpot_s, "e2e": result.e2e_s}
    for key, limit_ms in slo_ms.items():
        value = observed[key]
        if value is None:
            if key != "tpot":
                return False
        elif value * 1000.0 > limit_ms:
            return False
    return True


def summarize(
    results: Sequence[RequestResult],
    duration_s: float,
    percentiles: Sequence[float],
    slo_ms: dict[str, float],
) -> dict:
    """The measured part of one run's entry in summary.json (see soberana/bench/schema.py)."""
    ok = [r for r in results if r.ok]
    prompt_tokens = sum(r.prompt_tokens or 0 for r in ok)
    output_tokens = sum(r.output_tokens or 0 for r in ok)
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    samples = latency_samples(results)
    summary = {
        "duration_s": duration_s,
        "requests": {
            "sent": len(results),
            "completed": len(ok),
            "failed": len(results) - len(ok),
            "errors": dict(sorted(Counter(r.error_type for r in results if not r.ok).items())),
        },
        "tokens": {
            "prompt": prompt_tokens,
            "output": output_tokens,
            "cached_prompt": sum(r.cached_tokens for r in ok if r.cached_tokens is not None)
            if any(r.cached_tokens is not None for r in ok)
            else None,
            "sources": dict(sorted(Counter(r.token_source for r in ok).items())),
        },
        "throughput": {
            "requests_per_s": len(ok) * per_s,
            "output_tokens_per_s": output_tokens * per_s,
            "total_tokens_per_s": (prompt_tokens + output_tokens) * per_s,
        },
        "latency_ms": {name: describe(samples[name], percentiles) for name in LATENCY_METRICS},
        "goodput": None,
    }
    if slo_ms:
        good = sum(meets_slo(r, slo_ms) for r in results)
        summary["goodput"] = {
            "slo_ms": dict(slo_ms),
            "good_requests": good,
            "requests_per_s": good * per_s,
            "fraction": good / len(results) if results else 0.0,
        }
    return summary
