"""Two builds of the CPU paged-attention kernel, alternating on identical decode batches.

Compiles source A (by default the kernel as committed at `--base`, a git revision) and source
B (by default the working tree's), then times one decode step's attention (every layer) with
each, alternating A/B and B/A for `--reps` rounds in one process, so both see the same machine
state. Also checks that the two outputs agree. The KV blocks sit at random places in the pool,
as after a while of serving.

    python benchmarks/cpu_attention_ab.py --base HEAD~1 --dtype float32
    python benchmarks/cpu_attention_ab.py --a old.c --b soberana/ops/csrc/paged_attention.c
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_throughput import commit, machine  # noqa: E402

from soberana.ops.cpu import kernels as cpu_kernels  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "soberana/ops/csrc/paged_attention.c"


def source_at(revision: str, tmp: Path) -> Path:
    """The kernel source and its headers as committed at `revision`, in `tmp`."""
    listing = subprocess.run(["git", "ls-tree", "--name-only", revision, "soberana/ops/csrc/"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in listing.split():
        if name.endswith((".c", ".h")):
            text = subprocess.run(["git", "show", f"{revision}:{name}"], cwd=ROOT,
                                  capture_output=True, text=True, check=True).stdout
            (tmp / Path(name).name).write_text(text)
    return tmp / Path(SOURCE).name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", type=Path, help="source A (default: the kernel at --base)")
    ap.add_argument("--base", default="HEAD", help="git revision for A when --a is not given")
    ap.add_argument("--b", type=Path, default=ROOT / SOURCE, help="source B")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--context", type=int, default=192, help="longest context; others down to -64")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        a_src = args.a or source_at(args.base, Path(tmp))
        libs = {name: cpu_kernels.load_library(cpu_kernels.compile_library(src, cpu_kernels.FLAGS))
                for name, src in (("A", a_src), ("B", args.b))}

    dtype, bs = getattr(torch, args.dtype), args.block_size
    g = torch.Generator().manual_seed(0)
    per_seq = -(-args.context // bs)
    num_blocks = args.seqs * per_seq + 8
    shape = (num_blocks, bs, args.kv_heads, args.head_dim)
    k_cache = [torch.randn(shape, generator=g).to(dtype) for _ in range(args.layers)]
    v_cache = [torch.randn(shape, generator=g).to(dtype) for _ in range(args.layers)]
    table = torch.randperm(num_blocks, generator=g)[: args.seqs * per_seq].reshape(args.seqs, -1)
    table = table.to(torch.int32)
    lens = torch.randint(max(1, args.context - 64), args.context + 1, (args.seqs,), generator=g,
                         dtype=torch.int32)
    q = torch.randn(args.seqs, args.heads, args.head_dim, generator=g).to(dtype)
    outs = {name: torch.empty_like(q) for name in libs}
    scale = args.head_dim ** -0.5

    def step(name: str) -> float:
        real = cpu_kernels.attention_library
        cpu_kernels.attention_library = lambda: libs[name]
        try:
            t0 = time.perf_counter()
            for layer in range(args.layers):
                cpu_kernels.paged_attention(q, k_cache[layer], v_cache[layer], table, lens,
                                            scale, outs[name])
            return time.perf_counter() - t0
        finally:
            cpu_kernels.attention_library = real

    times: dict[str, list[float]] = {"A": [], "B": []}
    for _ in range(3):  # warm-up
        step("A"), step("B")
    for i in range(args.reps):
        for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
            times[name].append(step(name))
    kv_bytes = 2 * int(lens.sum()) * args.kv_heads * args.head_dim * q.element_size() * args.layers
    med = {name: statistics.median(ts) for name, ts in times.items()}
    result = {
        "benchmark": "cpu_attention_ab", "commit": commit(), "machine": machine(),
        "a": str(args.a or f"{args.base}:{SOURCE}"), "b": str(args.b),
        "workload": {k: v for k, v in vars(args).items() if k not in ("a", "b", "output")},
        "median_ms": {name: m * 1e3 for name, m in med.items()},
        "kv_gb_per_s": {name: kv_bytes / m / 1e9 for name, m in med.items()},
        "b_over_a": med["B"] / med["A"],
        "max_abs_diff": (outs["A"].float() - outs["B"].float()).abs().max().item(),
        "runs_ms": {name: [t * 1e3 for t in ts] for name, ts in times.items()},
    }
    for name in ("A", "B"):
        print(f"{name}: {result['median_ms'][name]:.2f} ms, {result['kv_gb_per_s'][name]:.1f} GB/s")
    print(f"B/A = {result['b_over_a']:.3f}; max |A - B| = {result['max_abs_diff']}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
