"""CPU norm, rotary and bfloat16 linear before and after their AVX2 + FMA paths; AVX-512 kept.

Builds csrc/cpu_layers.c and csrc/linear_bf16.c as committed at `--base` ("old") and in the
working tree ("new"), each for AVX2 + FMA (`-march=x86-64-v3`: what a CPU without AVX-512,
e.g. Zen 3, runs; before, the norm and rotary were the plain C loops, auto-vectorised, and
the bfloat16 linear had no kernel there) and for this CPU (`-march=native`: AVX-512 and
AVX512_BF16 on Zen 4). Times the same calls with each build, interleaved round by round in
one process, on SmolLM2-135M's shapes (hidden 576, 9 query / 3 KV heads of 64, intermediate
1536), over the model's 30 layers:

- add + RMSNorm of 64 rows (a decode step of 64 sequences), twice per layer;
- rotary + KV-cache write of 64 tokens, once per layer;
- the four linears of a layer (q/k/v 576->960, o 576->576, gate/up 576->3072, down
  1536->576) for 1 row (batch-1 decode) and 64 rows (30 layers), and 2,048 rows (a prefill
  chunk, one layer): bfloat16, and float32 with soberana's kernel next to oneDNN's packed
  matmul (the float32 path before it; oneDNN uses this CPU's widest vectors whatever the
  build).

    python benchmarks/cpu_layers_isa.py --base main --output benchmarks/results/cpu_layers_isa_zen4.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_throughput import commit, machine  # noqa: E402

from soberana.ops import cpu_kernels  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, LAYERS = 576, 9, 3, 64, 1536, 30
LINEARS = [(960, 576), (576, 576), (2 * INTER, 576), (576, INTER)]  # (N, K)


def sources_at(revision: str, tmp: Path) -> Path:
    """csrc/ (sources and headers) as committed at `revision`, in `tmp`."""
    listing = subprocess.run(["git", "ls-tree", "--name-only", revision, "soberana/ops/csrc/"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in listing.split():
        if name.endswith((".c", ".h")):
            text = subprocess.run(["git", "show", f"{revision}:{name}"], cwd=ROOT,
                                  capture_output=True, text=True, check=True).stdout
            (tmp / Path(name).name).write_text(text)
    return tmp


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="main", help="git revision of the old kernels")
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: each kernel's per-core speed, less disturbed by a "
                         "loaded host)")
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)

    layers, linears = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        old = sources_at(args.base, Path(tmp))
        new = ROOT / "soberana" / "ops" / "csrc"
        for isa in ("avx2", "native"):
            for name, src in (("old", old), ("new", new)):
                flags = cpu_kernels.ISA_FLAGS[isa]
                layers[f"{name}-{isa}"] = cpu_kernels.load_layers_library(
                    cpu_kernels.compile_library(src / "cpu_layers.c", flags))
                lib = cpu_kernels.load_linear_library(
                    cpu_kernels.compile_library(src / "linear_bf16.c", flags))
                if lib.linear_bf16_available() in (1, 2):  # old AVX2: no kernel
                    linears[f"{name}-{isa}"] = lib

    def with_layers(build, fn):
        real = cpu_kernels._layers_library
        cpu_kernels._layers_library = lambda: layers[build]
        try:
            return fn()
        finally:
            cpu_kernels._layers_library = real

    def with_linear(build, fn):
        real = cpu_kernels._linear_library
        cpu_kernels._linear_library = lambda: linears[build]
        try:
            return fn()
        finally:
            cpu_kernels._linear_library = real

    cases = {}
    for dtype in (torch.bfloat16, torch.float32):
        tag = "bf16" if dtype == torch.bfloat16 else "fp32"
        x = torch.randn(64, HIDDEN, generator=g).to(dtype)
        res = torch.randn(64, HIDDEN, generator=g).to(dtype)
        w = torch.randn(HIDDEN, generator=g).to(dtype)

        def norm(x=x, res=res, w=w):
            for _ in range(2 * LAYERS):
                cpu_kernels.add_rms_norm(x, res.clone(), w, 1e-5)

        cases[f"norm_64x{HIDDEN}_{tag}"] = ("layers", norm)
        qkv = torch.randn(64, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=g).to(dtype)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
        freqs = torch.outer(torch.arange(2048).float(), inv_freq)
        cos, sin = torch.cat([freqs.cos()] * 2, -1), torch.cat([freqs.sin()] * 2, -1)
        positions = torch.randint(0, 2048, (64,), generator=g)
        slots = torch.randperm(64 * 16, generator=g)[:64]
        kc = torch.zeros(64, 16, KV_HEADS, HEAD_DIM, dtype=dtype)
        vc = torch.zeros_like(kc)

        def rope(qkv=qkv, cos=cos, sin=sin, positions=positions, slots=slots, kc=kc, vc=vc):
            for _ in range(LAYERS):
                cpu_kernels.rope_and_cache(qkv, positions, cos, sin, kc, vc, slots, HEADS)

        cases[f"rope_64_{tag}"] = ("layers", rope)
    weights = [torch.randn(n, k, generator=g).to(torch.bfloat16) * 0.05 for n, k in LINEARS]
    for rows, reps in ((1, LAYERS), (64, LAYERS), (2048, 1)):
        xs = [torch.randn(rows, k, generator=g).to(torch.bfloat16) for _, k in LINEARS]
        packed = {}
        for b in linears:
            packed[b] = with_linear(b, lambda: [cpu_kernels.pack_bf16_linear(w) for w in weights])

        def linear(b, xs=xs, packed=packed, reps=reps):
            for _ in range(reps):
                for x, p, (n, _) in zip(xs, packed[b], LINEARS):
                    assert cpu_kernels.linear_bf16(x, p, n, None) is not None

        if rows < 2048:
            cases[f"linear_bf16_{rows}row"] = ("linear", linear)
        # float32: soberana's kernel (new builds) and oneDNN's packed matmul, the float32 path
        # before it, interleaved as one more "build"
        f32 = [b for b in linears if b.startswith("new")]
        wf = [torch.ops.mkldnn._reorder_linear_weight(w.float(), 64) for w in weights]
        packed_f32 = {b: with_linear(b, lambda: [cpu_kernels.pack_f32_linear(w.float())
                                                 for w in weights]) for b in f32}  # fmt: skip
        xf = [x.float() for x in xs]

        def linear_f32(b, xf=xf, wf=wf, packed=packed_f32, reps=reps):
            for _ in range(reps):
                for i, (x, (n, _)) in enumerate(zip(xf, LINEARS)):
                    if b == "onednn":
                        torch.ops.mkldnn._linear_pointwise(x, wf[i], None, "none", [], "")
                    else:
                        assert cpu_kernels.linear_f32(x, packed[b][i], n, None) is not None

        cases[f"linear_fp32_{rows}row" + ("_1layer" if reps == 1 else "")] = ("f32", linear_f32)

    def run(kind, build, fn) -> float:
        t0 = time.perf_counter()
        if kind == "layers":
            with_layers(build, fn)
        elif kind in ("linear", "f32"):
            real = cpu_kernels._linear_f32_library
            if build in linears:
                cpu_kernels._linear_f32_library = lambda: linears[build]
            try:
                with_linear(build, lambda: fn(build)) if build in linears else fn(build)
            finally:
                cpu_kernels._linear_f32_library = real
        else:
            fn()
        return time.perf_counter() - t0

    times = {}
    for cname, (kind, fn) in cases.items():
        builds = (list(layers) if kind == "layers" else list(linears) if kind == "linear"
                  else [b for b in linears if b.startswith("new")] + ["onednn"])  # fmt: skip
        times[cname] = {b: [] for b in builds}
        for b in builds:
            run(kind, b, fn)  # warm-up
        for i in range(args.reps):
            for b in builds if i % 2 == 0 else builds[::-1]:
                times[cname][b].append(run(kind, b, fn))
    med = {c: {b: statistics.median(ts) * 1e3 for b, ts in bt.items()} for c, bt in times.items()}
    # the fastest of the rounds: on a host shared with other work, the least disturbed one
    best = {c: {b: min(ts) * 1e3 for b, ts in bt.items()} for c, bt in times.items()}
    speedup = {c: m["old-avx2"] / m["new-avx2"] for c, m in best.items() if "old-avx2" in m}
    native = {c: m["new-native"] / m["old-native"] for c, m in best.items() if "old-native" in m}
    f32_vs_onednn = {c: {b: m[b] / m["onednn"] for b in m if b != "onednn"}
                     for c, m in best.items() if "onednn" in m}  # fmt: skip
    result = {
        "benchmark": "cpu_layers_isa", "commit": commit(), "machine": machine(),
        "base": args.base, "threads": torch.get_num_threads(), "reps": args.reps,
        "shape": {"hidden": HIDDEN, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                  "intermediate": INTER, "layers": LAYERS, "linears_NK": LINEARS},
        "builds": {b: f"{b.split('-')[0]} source, {' '.join(cpu_kernels.ISA_FLAGS[b.split('-')[1]])}"
                   for b in layers},
        "linear_bf16_builds": sorted(linears),
        "load_avg_at_end": os.getloadavg(),
        "median_ms": med,
        "min_ms": best,
        "ratios_from": "min_ms",
        "speedup_avx2_new_over_old": speedup,
        "native_new_over_old_time": native,
        "fp32_time_over_onednn": f32_vs_onednn,
        "runs_ms": {c: {b: [t * 1e3 for t in ts] for b, ts in bt.items()} for c, bt in times.items()},
    }  # fmt: skip
    for c, m in best.items():
        extra = ""
        if c in speedup:
            extra += f"; AVX2 new/old speed-up {speedup[c]:.2f}x"
        if c in native:
            extra += f"; native new/old time {native[c]:.3f}"
        if c in f32_vs_onednn:
            extra += "; time / oneDNN " + ", ".join(f"{b} {r:.2f}" for b, r in f32_vs_onednn[c].items())
        print(f"{c} (min): " + ", ".join(f"{b} {t:.2f} ms" for b, t in m.items()) + extra)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
