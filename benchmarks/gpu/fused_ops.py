"""Microbenchmark of the fused Triton kernels against the eager torch chains they replace.

Per op and token count T (1, 64, 256, 8192) at Llama-3.1-8B widths in bf16 (hidden 4096,
32/8 heads of 128, intermediate 14336): time per call inside a CUDA graph (how decode runs),
over enough distinct input sets that one replay reads 4x the L2; GB/s of the fewest bytes
the op must move (inputs read once, outputs written once) against the device-to-device copy
bandwidth measured in the same run (bytes read + written); CUDA kernels per call; host
microseconds per eager call (how prefill runs).

    python benchmarks/gpu/fused_ops.py --out DIR [--commit HASH]

Writes DIR/fused_ops.json (every number) and prints a summary table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from attention_kernels import copy_bandwidth_gbps, environment  # same folder
from triton.testing import do_bench

from soberana.ops.layers import (
    RotaryEmbedding,
    torch_rms_norm,
    torch_rotary_embedding,
    torch_silu_and_mul,
)
from soberana.ops.triton import layers as triton_layers

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 4096, 32, 8, 128, 14336
EPS = 1e-5
DTYPE = torch.bfloat16
TOKENS = [1, 64, 256, 8192]


def _inputs(op: str, n: int) -> dict:
    """One set of random inputs for `op` at `n` tokens."""
    def rnd(*shape):
        return torch.randn(*shape, device="cuda", dtype=DTYPE)

    if op in ("rms_norm", "add_rms_norm"):
        return {"x": rnd(n, HIDDEN), "res": rnd(n, HIDDEN), "w": rnd(HIDDEN)}
    if op in ("rotary", "qk_norm"):
        qkv = rnd(n, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
        q_size, kv_size = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
        q = qkv[:, :q_size].unflatten(1, (HEADS, HEAD_DIM))
        k = qkv[:, q_size : q_size + kv_size].unflatten(1, (KV_HEADS, HEAD_DIM))
        pos = torch.randint(0, 8192, (n,), device="cuda")
        return {"q": q, "k": k, "pos": pos, "w": rnd(HEAD_DIM)}
    return {"gate_up": rnd(n, 2 * INTER)}


def _min_bytes(op: str, n: int) -> int:
    """Bytes the op must move: each input read once, each output written once."""
    e = DTYPE.itemsize
    qk = n * (HEADS + KV_HEADS) * HEAD_DIM * e
    return {
        "rms_norm": 2 * n * HIDDEN * e + HIDDEN * e,
        "add_rms_norm": 4 * n * HIDDEN * e + HIDDEN * e,
        "qk_norm": 2 * qk + HEAD_DIM * e,
        "rotary": 2 * qk + n * HEAD_DIM * 4,  # + half a cos row and half a sin row, float32
        "silu_and_mul": 3 * n * INTER * e,
    }[op]


def _calls(op: str, s: dict, rope: RotaryEmbedding):
    """(fused call, torch chain) on input set `s`."""
    if op == "rms_norm":
        return (lambda: triton_layers.rms_norm(s["x"], s["w"], EPS),
                lambda: torch_rms_norm(s["x"], s["w"], EPS))  # fmt: skip
    if op == "add_rms_norm":
        return (lambda: triton_layers.fused_add_rms_norm(s["x"], s["res"], s["w"], EPS),
                lambda: torch_rms_norm(s["x"] + s["res"], s["w"], EPS))  # fmt: skip
    if op == "qk_norm":  # Qwen3's per-head norms: two calls, q then k
        return (lambda: (triton_layers.rms_norm(s["q"], s["w"], EPS),
                         triton_layers.rms_norm(s["k"], s["w"], EPS)),
                lambda: (torch_rms_norm(s["q"], s["w"], EPS),
                         torch_rms_norm(s["k"], s["w"], EPS)))  # fmt: skip
    if op == "rotary":
        args = (s["pos"], s["q"], s["k"], rope.cos, rope.sin)
        return (lambda: triton_layers.rotary_embedding(*args),
                lambda: torch_rotary_embedding(*args))  # fmt: skip
    return (lambda: triton_layers.silu_and_mul(s["gate_up"]),
            lambda: torch_silu_and_mul(s["gate_up"]))  # fmt: skip


def _graph_us(calls: list) -> float:
    """Microseconds per call of a CUDA graph that makes each call once (median of replays)."""
    for call in calls:
        call()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    ms = do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
    return ms * 1e3 / len(calls)


def _kernels_per_call(call) -> int | str:
    """CUDA kernels one eager call launches, counted by the torch profiler."""
    call()
    torch.cuda.synchronize()
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
    except RuntimeError as e:  # no CUPTI on this machine: record why, keep the timings
        return f"profiler unavailable: {e}"[:120]
    return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())


def _host_us(call, repeats: int = 200) -> float:
    """CPU microseconds to issue one eager call, not waiting for the GPU."""
    call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    host = (time.perf_counter() - start) / repeats * 1e6
    torch.cuda.synchronize()
    return host


def bench(op: str, n: int, rope: RotaryEmbedding, copy_gbps: float) -> dict:
    """Both implementations of `op` at `n` tokens."""
    nbytes = _min_bytes(op, n)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    copies = max(1, min(64, math.ceil(4 * l2 / nbytes)))
    sets = [_inputs(op, n) for _ in range(copies)]
    row = {"op": op, "tokens": n, "min_bytes": nbytes, "copies": copies}
    for name, index in (("fused", 0), ("torch", 1)):
        calls = [_calls(op, s, rope)[index] for s in sets]
        us = _graph_us(calls)
        gbps = nbytes / us / 1e3
        row[name] = {"us": us, "GBps": gbps, "frac_of_copy": gbps / copy_gbps}
        if n in (1, 8192):
            row[name]["kernels"] = _kernels_per_call(calls[0])
            row[name]["host_us"] = _host_us(calls[0])
    del sets
    torch.cuda.empty_cache()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON results")
    parser.add_argument("--commit", help="commit to record when the copy has no .git")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    report = {"environment": environment(args.commit), "copy_GBps": copy_bandwidth_gbps()}
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
    rope = RotaryEmbedding(inv_freq, 8192).cuda()
    report["rows"] = [
        bench(op, n, rope, report["copy_GBps"])
        for op in ("rms_norm", "add_rms_norm", "qk_norm", "rotary", "silu_and_mul")
        for n in TOKENS
    ]
    (args.out / "fused_ops.json").write_text(json.dumps(report, indent=2))
    print_summary(report)
    return 0


def print_summary(report: dict) -> None:
    """The short table a reader looks at first; the JSON holds everything."""
    env = report["environment"]
    print(f"\n{env['gpu']} | torch {env['torch']} | triton {env['triton']} | "
          f"commit {env['commit']}")  # fmt: skip
    print(f"copy bandwidth {report['copy_GBps']:.0f} GB/s (read + write), measured in this run")
    print("per call inside a CUDA graph: us, GB/s of minimal bytes, % of copy bandwidth; "
          "kernels / host us per eager call at T=1 and 8192")  # fmt: skip
    for r in report["rows"]:
        f, t = r["fused"], r["torch"]
        extra = ""
        if "kernels" in f:
            extra = (f" | kernels {f['kernels']} vs {t['kernels']}, host us "
                     f"{f['host_us']:.0f} vs {t['host_us']:.0f}")  # fmt: skip
        print(f"  {r['op']:>12} T={r['tokens']:>5}: fused {f['us']:8.1f} us {f['GBps']:6.0f} GB/s "
              f"{100 * f['frac_of_copy']:5.1f}% | torch {t['us']:8.1f} us {t['GBps']:6.0f} GB/s "
              f"{100 * t['frac_of_copy']:5.1f}% | x{t['us'] / f['us']:.1f}{extra}")  # fmt: skip
    layer = {}
    for name in ("fused", "torch"):
        us = {r["op"]: r[name]["us"] for r in report["rows"] if r["tokens"] == 1}
        # A Llama layer: two add + norms (residual threaded through), rotary, SiLU-and-mul.
        layer[name] = 2 * us["add_rms_norm"] + us["rotary"] + us["silu_and_mul"]
    print(f"\nT=1, one Llama layer's elementwise ops: fused {layer['fused']:.1f} us, torch "
          f"{layer['torch']:.1f} us; x32 layers: {32 * layer['fused'] / 1e3:.2f} ms vs "
          f"{32 * layer['torch'] / 1e3:.2f} ms per decode step")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
