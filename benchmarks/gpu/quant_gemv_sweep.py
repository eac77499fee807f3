"""Tile shapes of the batch-1 GEMV (soberana/ops/triton/gemv.py) for each weight format, at
Llama-3.1-8B's four projections: time per call (CUDA graph of 20 calls, median of runs) and
read bandwidth, for bf16, int8, fp8 and int4 weights.

A program reads BLOCK_N rows x BLOCK_K columns per iteration; one-byte weights move half the
bytes of bf16 per column, so the bf16 default (1024 columns) gives them narrower loads per
thread. The sweep shows which shape each format needs.

    python benchmarks/gpu/quant_gemv_sweep.py --out DIR
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import time
from pathlib import Path

import torch

from soberana.ops.triton.gemv import DEFAULT_CONFIG, GemvConfig, default_config, gemv
from soberana.quantization import schemes

# (name, N, K, gated) of Llama-3.1-8B's decode projections
SHAPES = [("qkv", 6144, 4096, False), ("o", 4096, 4096, False),
          ("gate_up", 2 * 14336, 4096, True), ("down", 4096, 14336, False)]  # fmt: skip
CONFIGS = [GemvConfig(bn, bk, w, 1) for bn in (2, 4, 8) for bk in (1024, 2048, 4096)
           for w in (4,)]  # fmt: skip


def weights(fmt: str, n: int, k: int) -> dict:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    if fmt == "bf16":
        return {"weight": w}
    if fmt == "int8":
        q, s = schemes.quantize_int8(w)
        return {"weight": q, "weight_scale": s.to(torch.bfloat16)}
    if fmt == "fp8":
        q, s = schemes.quantize_fp8(w)
        return {"weight": q, "weight_scale": s.to(torch.bfloat16)}
    packed, s, z = schemes.quantize_int4(w, schemes.group_size_for(k))
    return {"weight": packed, "weight_scale": s.to(torch.bfloat16), "weight_zero": z,
            "group_size": schemes.group_size_for(k)}  # fmt: skip


def time_us(fns: list, calls: int = 24, runs: int = 15) -> float:
    """Median time of one call; the calls cycle through `fns`, whose weights are distinct
    copies larger than L2 together (a decode step reads every weight once, from HBM)."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return sorted(times)[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--formats", default="bf16,int8,fp8,int4")
    args = ap.parse_args()
    rows = []
    for fmt in args.formats.split(","):
        total_default = total_best = 0.0
        for name, n, k, gated in SHAPES:
            kw = weights(fmt, n, k)
            nbytes = sum(t.numel() * t.element_size() for t in kw.values()
                         if isinstance(t, torch.Tensor))  # fmt: skip
            # copies of W past 3x the L2 (50 MB on an H100, 60 MB on an H200)
            kws = [kw] + [weights(fmt, n, k) for _ in range(-(-180_000_000 // nbytes) - 1)]
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            results = {}
            chosen = default_config(kw["weight"].dtype, "weight_zero" in kw)
            for cfg in [*CONFIGS, chosen]:
                if k % cfg.block_k and cfg.block_k > k:
                    continue
                try:
                    us = time_us([functools.partial(gemv, x, gated=gated, config=cfg, **w)
                                  for w in kws])  # fmt: skip
                except Exception as e:  # a shape this config cannot compile: recorded
                    results[str(cfg)] = f"{type(e).__name__}: {str(e)[:120]}"
                    continue
                results[str(cfg)] = us
            timed = {c: v for c, v in results.items() if isinstance(v, float)}
            best = min(timed, key=timed.get)
            row = {"format": fmt, "op": name, "n": n, "k": k, "bytes": nbytes,
                   "default": str(chosen), "default_us": timed[str(chosen)],
                   "default_GBps": nbytes / timed[str(chosen)] / 1e3,
                   "bf16_default_config": str(DEFAULT_CONFIG),
                   "best": best, "best_us": timed[best], "best_GBps": nbytes / timed[best] / 1e3,
                   "all_us": results}  # fmt: skip
            total_default += timed[str(chosen)]
            total_best += timed[best]
            rows.append(row)
            print(f"{fmt:>5} {name:>8} default {row['default_us']:7.1f} us "
                  f"{row['default_GBps']:6.0f} GB/s | best {best} {row['best_us']:7.1f} us "
                  f"{row['best_GBps']:6.0f} GB/s", flush=True)  # fmt: skip
        print(f"{fmt:>5} layer: default {total_default:.1f} us, best {total_best:.1f} us",
              flush=True)  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quant_gemv_sweep.json").write_text(json.dumps(
        {"commit": commit.strip(), "gpu": torch.cuda.get_device_name(), "time": time.time(),
         "rows": rows}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
