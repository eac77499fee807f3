"""The summary statistics, on synthetic latencies whose percentiles are known."""

from __future__ import annotations

import random

import pytest

from soberana.bench.request import RequestResult, RequestSpec
from soberana.bench.stats import describe, meets_slo, summarize


def result(
    ttft=0.1, e2e=1.0, output_tokens=10, prompt_tokens=20, error=None, itl=()
) -> RequestResult:
    r = RequestResult(
        spec=RequestSpec("r", [{"role": "user", "content": "x"}], max_tokens=16),
        status=200 if error is None else 500,
        ttft_s=ttft,
        e2e_s=e2e,
        itl_s=list(itl),
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
    )
    if error:
        r.error_type, r.ttft_s, r.e2e_s = error, None, None
    return r


def test_percentiles_of_one_to_hundred_ms_interpolate_linearly():
    values_s = [i / 1000 for i in range(1, 101)]
    random.Random(0).shuffle(values_s)  # order must not matter
    stats = describe(values_s, [50, 90, 95, 99, 99.9])
    assert stats["count"] == 100
    assert stats["mean"] == pytest.approx(50.5)
    assert stats["min"] == pytest.approx(1.0) and stats["max"] == pytest.approx(100.0)
    # Linear interpolation between order statistics: p = 1 + (100 - 1) * q.
    assert stats["p50"] == pytest.approx(50.5)
    assert stats["p90"] == pytest.approx(90.1)
    assert stats["p95"] == pytest.approx(95.05)
    assert stats["p99"] == pytest.approx(99.01)
    assert stats["p99.9"] == pytest.approx(99.901)


def test_percentiles_of_a_large_exponential_sample_match_its_quantile_function():
    rng = random.Random(1)
    mean_s = 0.02
    values = [rng.expovariate(1 / mean_s) for _ in range(200_000)]
    stats = describe(values, [50, 99])
    # Exponential quantiles: -mean * ln(1 - q).
    assert stats["mean"] == pytest.approx(20.0, rel=0.01)
    assert stats["p50"] == pytest.approx(20.0 * 0.693147, rel=0.02)
    assert stats["p99"] == pytest.approx(20.0 * 4.605170, rel=0.03)


def test_no_samples_gives_no_statistics():
    assert describe([], [50]) is None


def test_tpot_is_decode_time_over_tokens_after_the_first():
    r = result(ttft=0.2, e2e=1.1, output_tokens=10)
    assert r.tpot_s == pytest.approx(0.1)
    assert result(output_tokens=1).tpot_s is None  # one token: no decode interval


def test_counts_add_up_and_failures_are_grouped_by_type():
    results = (
        [result() for _ in range(7)] + [result(error="http_500")] * 2 + [result(error="timeout")]
    )
    s = summarize(results, duration_s=2.0, percentiles=[50], slo_ms={})
    assert s["requests"] == {
        "sent": 10,
        "completed": 7,
        "failed": 3,
        "errors": {"http_500": 2, "timeout": 1},
    }
    assert s["latency_ms"]["ttft"]["count"] == 7  # failed requests have no latency


def test_throughput_counts_successful_requests_and_their_tokens_only():
    results = [result(prompt_tokens=100, output_tokens=50) for _ in range(4)] + [
        result(error="http_500")
    ]
    s = summarize(results, duration_s=2.0, percentiles=[50], slo_ms={})
    assert s["throughput"]["requests_per_s"] == pytest.approx(2.0)
    assert s["throughput"]["output_tokens_per_s"] == pytest.approx(100.0)
    assert s["throughput"]["total_tokens_per_s"] == pytest.approx(300.0)
    assert s["tokens"]["prompt"] == 400 and s["tokens"]["output"] == 200


def test_inter_token_latencies_pool_every_gap_of_every_request():
    results = [result(itl=[0.01, 0.02]), result(itl=[0.03]), result(error="drop", itl=[9.0])]
    s = summarize(results, duration_s=1.0, percentiles=[50], slo_ms={})
    assert s["latency_ms"]["itl"]["count"] == 3
    assert s["latency_ms"]["itl"]["p50"] == pytest.approx(20.0)


def test_goodput_counts_requests_within_every_limit():
    results = [
        result(ttft=0.05, e2e=0.50, output_tokens=10),  # good: tpot 50 ms
        result(ttft=0.30, e2e=0.50, output_tokens=10),  # TTFT too slow
        result(ttft=0.05, e2e=2.00, output_tokens=10),  # TPOT too slow
        result(ttft=0.05, e2e=0.05, output_tokens=1),  # one token: no TPOT, good
        result(error="http_500"),  # failed: never good
    ]
    slo = {"ttft": 100.0, "tpot": 60.0}
    assert [meets_slo(r, slo) for r in results] == [True, False, False, True, False]
    s = summarize(results, duration_s=2.0, percentiles=[50], slo_ms=slo)
    assert s["goodput"]["good_requests"] == 2
    assert s["goodput"]["requests_per_s"] == pytest.approx(1.0)
    assert s["goodput"]["fraction"] == pytest.approx(0.4)


def test_goodput_is_absent_without_slo():
    assert summarize([result()], 1.0, [50], {})["goodput"] is None
