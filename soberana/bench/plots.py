"""PNG plots: latency histograms of a run, and latency/throughput against load for a sweep."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402

from soberana.bench.request import RequestResult  # noqa: E402
from soberana.bench.stats import latency_samples, percentile_key  # noqa: E402

_HIST_PANELS = (
    ("ttft", "TTFT"),
    ("tpot", "TPOT"),
    ("itl", "Inter-token latency"),
    ("e2e", "End-to-end latency"),
)


def plot_latency_histograms(
    results: Sequence[RequestResult], path: Path, title: str, percentiles: Sequence[float]
) -> None:
    """Four histograms (TTFT, TPOT, ITL, E2E, in ms) with the percentiles marked."""
    samples = latency_samples(results)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (name, label) in zip(axes.flat, _HIST_PANELS, strict=True):
        values = [v * 1000.0 for v in samples[name]]
        ax.set_title(label)
        ax.set_xlabel("ms")
        ax.set_ylabel("requests" if name != "itl" else "token gaps")
        if not values:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.hist(values, bins=min(50, max(10, len(values) // 5)), color="tab:blue", alpha=0.8)
        ordered = sorted(values)
        for p in percentiles:
            # Nearest-rank is enough to place a marker; the tables carry the exact values.
            v = ordered[min(len(ordered) - 1, int(round(p / 100.0 * (len(ordered) - 1))))]
            ax.axvline(v, color="tab:red", linestyle="--", linewidth=1)
            ax.annotate(
                percentile_key(p),
                (v, 1),
                xycoords=("data", "axes fraction"),
                rotation=90,
                va="top",
                ha="right",
                fontsize=8,
                color="tab:red",
            )
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sweep(runs: Sequence[dict], path: Path, percentiles: Sequence[float]) -> None:
    """TTFT, TPOT and throughput against the swept concurrency or request rate."""
    closed = runs[0]["load"]["mode"] == "closed"
    xs = [r["load"]["concurrency"] if closed else _rate(r["load"]["request_rate"]) for r in runs]
    keys = ["mean"] + [percentile_key(p) for p in percentiles]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, metric, label in ((axes[0], "ttft", "TTFT (ms)"), (axes[1], "tpot", "TPOT (ms)")):
        for key in keys:
            ys = [(r["latency_ms"][metric] or {}).get(key) for r in runs]
            ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label=key)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(
        xs,
        [r["throughput"]["output_tokens_per_s"] for r in runs],
        marker="o",
        color="tab:green",
        label="output tok/s",
    )
    ax.set_ylabel("output tokens/s")
    twin = ax.twinx()
    twin.plot(
        xs,
        [r["throughput"]["requests_per_s"] for r in runs],
        marker="s",
        linestyle="--",
        color="tab:purple",
        label="req/s",
    )
    twin.set_ylabel("requests/s")
    ax.legend(handles=ax.get_lines() + twin.get_lines(), fontsize=8, loc="best")
    ax.set_title("Throughput")
    finite = [x for x in xs if x == x]
    for a in axes:
        a.set_xlabel("concurrency" if closed else "request rate (req/s)")
        a.grid(alpha=0.3)
        if finite and min(finite) > 0 and max(finite) / min(finite) >= 8:
            a.set_xscale("log", base=2)  # sweeps usually double the load at each step
            a.set_xticks(finite, [f"{x:g}" for x in finite])
            a.minorticks_off()
    axes[0].set_title("Time to first token")
    axes[1].set_title("Time per output token")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _rate(value: float | str) -> float:
    # An infinite rate has no place on a numeric axis: that point is left out of the plot.
    return float("nan") if value == "inf" else float(value)
