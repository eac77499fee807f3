"""CPU paged attention before and after the AVX2 + FMA path, and the AVX-512 path kept.

Builds the kernel as committed at `--base` ("old") and the working tree's ("new"), each for
AVX2 + FMA (`-march=x86-64-v3`: what a CPU without AVX-512, e.g. Zen 3, runs; before the AVX2
path that was the portable C loop, auto-vectorised) and for this CPU (`-march=native`:
AVX-512 on Zen 4). Times the same calls with all four, interleaved round by round in one
process, on SmolLM2-135M's attention shape (9 query heads, 3 KV heads of 64), float32:

- decode, 1 sequence at 128 tokens of context, every layer;
- decode, 64 sequences at 128-192 tokens (the 64 x 128/64 batched workload), every layer;
- prefill, one prompt of --prompt tokens, one layer (30 of them make a forward).

--peaked gives every sequence an attention sink: its first key scores ~125 above the others
(after the 1/8 scale), so that every other key's exp(score - max) is below float32's smallest
normal, 1.2e-38 (where exp returns a subnormal, each costs a microcode assist).

    python benchmarks/cpu_attention_isa.py --base main --output benchmarks/results/cpu_attention_isa_zen4.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_attention_ab import SOURCE, source_at  # noqa: E402
from offline_throughput import commit, machine  # noqa: E402

from soberana.ops.cpu import kernels as cpu_kernels  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HEADS, KV_HEADS, HEAD_DIM, LAYERS, BS = 9, 3, 64, 30, 16


def make_case(seqs: int, context: int, new: int, layers: int, dtype: torch.dtype, seed: int = 0,
              peaked: bool = False):
    """Caches, tables and queries for `seqs` sequences of up to `context` tokens, `new` of
    them queries (1: a decode); `peaked`: the first key of each sequence is a sink, 100 u for
    a unit vector u that every query has 10 of."""
    g = torch.Generator().manual_seed(seed)
    per_seq = -(-context // BS)
    num_blocks = seqs * per_seq + 8
    shape = (num_blocks, BS, KV_HEADS, HEAD_DIM)
    k = [torch.randn(shape, generator=g).to(dtype) for _ in range(layers)]
    v = [torch.randn(shape, generator=g).to(dtype) for _ in range(layers)]
    table = torch.randperm(num_blocks, generator=g)[: seqs * per_seq].reshape(seqs, -1).to(torch.int32)
    if new == 1:
        lens = torch.randint(max(1, context - 64), context + 1, (seqs,), generator=g, dtype=torch.int32)
        query_start = None
    else:
        lens = torch.full((seqs,), context, dtype=torch.int32)
        query_start = torch.arange(0, seqs * new + 1, new, dtype=torch.int32)
    q = torch.randn(seqs * new, HEADS, HEAD_DIM, generator=g)
    if peaked:
        u = torch.nn.functional.normalize(torch.randn(HEAD_DIM, generator=g), dim=0)
        q += 10 * u
        for layer in k:
            layer[table[:, 0], 0] = (100 * u).to(dtype)
    return k, v, table, lens, q.to(dtype), query_start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="main", help="git revision of the old kernel")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--output", type=Path)
    ap.add_argument("--peaked", action="store_true", help="an attention sink in every sequence")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)

    builds = {}
    with tempfile.TemporaryDirectory() as tmp:
        old = source_at(args.base, Path(tmp))
        for isa in ("avx2", "native"):
            for name, src in (("old", old), ("new", ROOT / SOURCE)):
                path = cpu_kernels.compile_library(src, cpu_kernels.ISA_FLAGS[isa])
                builds[f"{name}-{isa}"] = cpu_kernels.load_library(path)
    cases = {
        "decode_1x128": (make_case(1, 128, 1, LAYERS, dtype, peaked=args.peaked), LAYERS),
        "decode_64x192": (make_case(64, 192, 1, LAYERS, dtype, peaked=args.peaked), LAYERS),
        f"prefill_1x{args.prompt}": (make_case(1, args.prompt, args.prompt, 1, dtype, peaked=args.peaked), 1),
    }
    scale = HEAD_DIM**-0.5

    def run(build: str, case) -> tuple[float, torch.Tensor]:
        (k, v, table, lens, q, query_start), layers = case
        out = torch.empty_like(q)
        real = cpu_kernels.attention_library
        cpu_kernels.attention_library = lambda: builds[build]
        try:
            t0 = time.perf_counter()
            for layer in range(layers):
                cpu_kernels.paged_attention(q, k[layer], v[layer], table, lens, scale, out,
                                            query_start)  # fmt: skip
            return time.perf_counter() - t0, out
        finally:
            cpu_kernels.attention_library = real

    times = {c: {b: [] for b in builds} for c in cases}
    diffs = {}
    for cname, case in cases.items():
        outs = {b: run(b, case)[1] for b in builds}  # warm-up, and the outputs to compare
        ref = outs["old-native"].float()
        diffs[cname] = {b: (o.float() - ref).abs().max().item() for b, o in outs.items()}
        order = list(builds)
        for i in range(args.reps):
            for b in order if i % 2 == 0 else order[::-1]:
                times[cname][b].append(run(b, case)[0])
    med = {c: {b: statistics.median(ts) * 1e3 for b, ts in bt.items()} for c, bt in times.items()}
    result = {
        "benchmark": "cpu_attention_isa", "commit": commit(), "machine": machine(),
        "base": args.base, "dtype": args.dtype, "peaked": args.peaked, "threads": torch.get_num_threads(),
        "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "layers": LAYERS},
        "builds": {b: f"{b.split('-')[0]} source, {' '.join(cpu_kernels.ISA_FLAGS[b.split('-')[1]])}"
                   for b in builds},
        "median_ms": med,
        "speedup_avx2_new_over_old": {c: m["old-avx2"] / m["new-avx2"] for c, m in med.items()},
        "native_new_over_old_time": {c: m["new-native"] / m["old-native"] for c, m in med.items()},
        "max_abs_diff_vs_old_native": diffs,
        "runs_ms": {c: {b: [t * 1e3 for t in ts] for b, ts in bt.items()} for c, bt in times.items()},
    }  # fmt: skip
    for c, m in med.items():
        print(f"{c}: " + ", ".join(f"{b} {t:.2f} ms" for b, t in m.items())
              + f"; AVX2 new/old speed-up {result['speedup_avx2_new_over_old'][c]:.2f}x"
              + f"; native new/old time {result['native_new_over_old_time'][c]:.3f}")  # fmt: skip
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
