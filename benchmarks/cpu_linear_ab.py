"""Soberana's bfloat16 linear kernel against oneDNN's packed matmul, alternating on the same
inputs.

For each row count, one "step" runs x [rows, K] through the projections of `--layers` layers
of the 125M Llama shape (qkv 2304x768, o 768x768, gate_up 4096x768, down 768x2048) plus the
output head (32000x768). Every layer has its own weights, so they come from memory as in a
real forward pass. The two backends (`PackedLinear` with soberana_kernel=True and False,
oneDNN's) alternate step by step for `--reps` rounds in one process, and the two outputs are
compared. Writes the medians, GFLOP/s and every run as JSON.

    python benchmarks/cpu_linear_ab.py --rows 1 64 2048 --output benchmarks/results/cpu_linear_ab_zen4.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_throughput import commit, machine  # noqa: E402

from soberana.ops.cpu import linear as cpu_linear  # noqa: E402

LAYER = [(2304, 768), (768, 768), (4096, 768), (768, 2048)]
HEAD = (32000, 768)


def packed(weight: torch.Tensor, backend: str) -> cpu_linear.PackedLinear:
    layer = cpu_linear.PackedLinear(weight, None, soberana_kernel=backend == "native")
    if (layer.native is not None) != (backend == "native"):
        raise SystemExit(f"the {backend} backend is not available here")
    return layer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 64, 2048])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()

    g = torch.Generator().manual_seed(0)
    shapes = LAYER * args.layers + [HEAD]
    weights = [torch.randn(n, k, generator=g).bfloat16() for n, k in shapes]
    layers = {b: [packed(w, b) for w in weights] for b in ("native", "onednn")}
    del weights
    flops_per_row = sum(2 * n * k for n, k in shapes)
    results = []
    for rows in args.rows:
        xs = {k: torch.randn(rows, k, generator=g).bfloat16() for k in {k for _, k in shapes}}

        def step(backend: str, xs=xs) -> tuple[float, list[torch.Tensor]]:
            t0 = time.perf_counter()
            outs = [lin(xs[lin.in_features]) for lin in layers[backend]]
            return time.perf_counter() - t0, outs

        step("native"), step("onednn")  # warm-up
        times: dict[str, list[float]] = {"native": [], "onednn": []}
        for i in range(args.reps):
            for b in ("native", "onednn") if i % 2 == 0 else ("onednn", "native"):
                times[b].append(step(b)[0])
        (_, a), (_, b) = step("native"), step("onednn")
        differ = sum(int((x != y).sum()) for x, y in zip(a, b)) / sum(x.numel() for x in a)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {
            "rows": rows,
            "median_ms": {k: v * 1e3 for k, v in med.items()},
            "gflops": {k: rows * flops_per_row / v / 1e9 for k, v in med.items()},
            "native_over_onednn": med["native"] / med["onednn"],
            "fraction_of_outputs_that_differ": differ,
            "runs_ms": {k: [t * 1e3 for t in v] for k, v in times.items()},
        }
        results.append(row)
        print(f"rows {rows}: native {row['median_ms']['native']:.2f} ms "
              f"({row['gflops']['native']:.0f} GFLOP/s), oneDNN {row['median_ms']['onednn']:.2f} "
              f"ms ({row['gflops']['onednn']:.0f}); native/oneDNN {row['native_over_onednn']:.3f}; "
              f"outputs differing {differ:.2e}")  # fmt: skip
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        report = {"benchmark": "cpu_linear_ab", "commit": commit(), "machine": machine(),
                  "workload": {k: v for k, v in vars(args).items() if k != "output"},
                  "results": results}  # fmt: skip
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
