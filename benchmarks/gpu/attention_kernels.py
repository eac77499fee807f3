"""Microbenchmark of the Triton paged-attention kernels on one GPU, with peers from the same run.

Decode: achieved GB/s of KV-cache read (every context key and value read once) against the
device-to-device copy bandwidth measured here (bytes read + written). Prefill: TFLOP/s of
causal attention against torch SDPA's backends on the same shapes, and a bf16 matmul rate.
The model shape is Llama-3.1-8B's / Qwen3-8B's attention: 32 query heads, 8 kv heads, head
dim 128, block size 16, bf16. Times are medians of `triton.testing.do_bench`, which flushes
the L2 cache before every call, so small caches are not read from L2.

    python benchmarks/gpu/attention_kernels.py --out DIR [--sweep]

Writes DIR/attention_kernels.json (every number) and prints a summary table.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import subprocess
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from triton.testing import do_bench

from soberana.ops.triton.cache_write import reshape_and_cache
from soberana.ops.triton.decode_attention import (
    DecodeConfig,
    choose_num_splits,
    default_decode_config,
    paged_decode_attention,
)
from soberana.ops.triton.prefill_attention import (
    PrefillConfig,
    default_prefill_config,
    paged_prefill_attention,
)

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
DECODE_BATCHES = [1, 16, 64, 256]
DECODE_CONTEXTS = [1024, 4096, 16384, 32768]
# (requests, new tokens each, cached tokens each)
PREFILL_SHAPES = [(1, 8192, 0), (4, 4096, 0), (16, 1024, 0), (64, 512, 0), (1, 2048, 30720)]
SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def _median_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable: {e}"


def environment(commit: str | None) -> dict:
    """Commit, versions and hardware, recorded beside the numbers."""
    if commit is None:
        head = _run(["git", "rev-parse", "HEAD"])
        dirty = _run(["git", "status", "--porcelain", "--", "soberana", "benchmarks"])
        commit = head if head and not head.startswith("unavailable") else "uncommitted"
        commit += " (dirty)" if dirty and not dirty.startswith("unavailable") else ""
    props = torch.cuda.get_device_properties(0)
    return {
        "commit": commit,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "gpu": props.name,
        "sm_count": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "nvidia_smi": _run(["nvidia-smi"]),
        "lscpu": _run(["lscpu"]),
    }


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy of 4 GiB, bytes read plus bytes written per second."""
    src = torch.randn(2**31, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    nbytes = 2 * src.numel() * src.element_size()
    return nbytes / ms / 1e6


def read_bandwidth_gbps() -> float:
    """A 4 GiB bf16 sum through torch: bytes read per second (no writes, unlike a copy)."""
    src = torch.randn(2**31, device="cuda", dtype=torch.bfloat16)
    ms = _median_ms(lambda: src.sum(dtype=torch.float32))
    return src.numel() * src.element_size() / ms / 1e6


def matmul_tflops() -> float:
    """bf16 8192^3 matrix product on random data through torch (cuBLAS)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    b = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    ms = _median_ms(lambda: a @ b)
    return 2 * 8192**3 / ms / 1e9


def _paged_cache(num_seqs: int, context: int) -> tuple[torch.Tensor, ...]:
    """Random bf16 caches holding `num_seqs` contexts in a random permutation of blocks."""
    blocks_per_seq = math.ceil(context / BLOCK_SIZE)
    num_blocks = num_seqs * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, device="cuda", dtype=DTYPE)
    v_cache = torch.randn(shape, device="cuda", dtype=DTYPE)
    perm = torch.randperm(num_blocks, device="cuda", dtype=torch.int64).to(torch.int32)
    block_table = perm.view(num_seqs, blocks_per_seq)
    return k_cache, v_cache, block_table


def _graph_ms(calls: list) -> float:
    """Time per call of a CUDA graph that makes each call once: kernels without launch gaps."""
    for call in calls:
        call()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return _median_ms(graph.replay) / len(calls)


def _host_us(call, repeats: int = 200) -> float:
    """CPU time to issue one eager call (Python, checks, launches), not waiting for the GPU."""
    call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    host = (time.perf_counter() - start) / repeats * 1e6
    torch.cuda.synchronize()
    return host


def _copies_beyond_l2(nbytes: int) -> int:
    """Input sets to rotate through so that one graph replay reads 4x the L2 size."""
    l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, min(64, math.ceil(4 * l2_bytes / nbytes)))


def bench_decode(
    batch: int, context: int, config: DecodeConfig | None = None, peers: bool = True
) -> dict:
    """Decode of `batch` sequences of `context` tokens: ours and SDPA on a contiguous cache.

    Timed as CUDA-graph replays (as the engine runs decode) over enough distinct caches that
    a replay reads 4x the L2, so small contexts are read from HBM, not from L2.
    """
    kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
    copies = _copies_beyond_l2(kv_bytes)
    k_cache, v_cache, block_table = _paged_cache(batch * copies, context)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    qs = [
        torch.randn(batch, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE) for _ in range(copies)
    ]
    outs = [torch.empty_like(q) for q in qs]
    scale = HEAD_DIM**-0.5
    calls = [
        functools.partial(
            paged_decode_attention, qs[i], k_cache, v_cache, seq_lens,
            block_table[i * batch : (i + 1) * batch], scale, out=outs[i], config=config,
        )
        for i in range(copies)
    ]  # fmt: skip
    ms = _graph_ms(calls)
    row = {"batch": batch, "context": context, "copies": copies, "ms": ms,
           "kv_GBps": kv_bytes / ms / 1e6}  # fmt: skip
    if not peers:
        return row
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tile_n = default_decode_config(HEAD_DIM, DTYPE).tile_n
    row["splits"] = choose_num_splits(batch, NUM_KV_HEADS, context, tile_n, sms)
    row["eager_ms"] = _median_ms(calls[0])
    # Peer: SDPA over the same keys laid out contiguously [B, Hkv, ctx, D].
    k = k_cache[block_table.long()].flatten(1, 2).transpose(1, 2).contiguous()
    v = v_cache[block_table.long()].flatten(1, 2).transpose(1, 2).contiguous()
    sdpa_calls = [
        functools.partial(
            F.scaled_dot_product_attention, qs[i].unsqueeze(2), k[i * batch : (i + 1) * batch],
            v[i * batch : (i + 1) * batch], scale=scale, enable_gqa=True,
        )
        for i in range(copies)
    ]  # fmt: skip
    row["sdpa"] = {}
    for name, backend in SDPA_BACKENDS.items():
        try:
            with sdpa_kernel([backend]):
                sdpa_ms = _graph_ms(sdpa_calls)
            row["sdpa"][name] = {"ms": sdpa_ms, "kv_GBps": kv_bytes / sdpa_ms / 1e6}
        except RuntimeError as e:
            row["sdpa"][name] = {"error": str(e).splitlines()[0][:160]}
    return row


def host_overheads() -> dict:
    """CPU microseconds to issue each op eagerly (what CUDA graphs remove)."""
    k_cache, v_cache, block_table = _paged_cache(4, 1024)
    seq_lens = torch.full((4,), 1024, dtype=torch.int32, device="cuda")
    qsl = torch.arange(0, 5, dtype=torch.int32, device="cuda") * 128
    q = torch.randn(512, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    kv = torch.randn(512, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    slots = torch.arange(512, device="cuda", dtype=torch.int64)
    scale = HEAD_DIM**-0.5
    return {
        "paged_decode_attention_B4": _host_us(
            lambda: paged_decode_attention(q[:4], k_cache, v_cache, seq_lens, block_table, scale)
        ),
        "paged_prefill_attention_4x128": _host_us(
            lambda: paged_prefill_attention(
                q, k_cache, v_cache, qsl, seq_lens, block_table, scale, 128
            )  # fmt: skip
        ),
        "reshape_and_cache_512": _host_us(
            lambda: reshape_and_cache(kv, kv, k_cache, v_cache, slots)
        ),
    }


def _causal_flops(num_seqs: int, q_len: int, cached: int) -> float:
    # Query j sees cached + j + 1 keys; QK^T and PV cost 2 * D FLOPs per (query, key, head) each.
    keys_seen = q_len * cached + q_len * (q_len + 1) / 2
    return 4.0 * num_seqs * NUM_HEADS * HEAD_DIM * keys_seen


def bench_prefill(num_seqs: int, q_len: int, cached: int, config: PrefillConfig | None = None):
    """Causal prefill of `num_seqs` requests of `q_len` new tokens after `cached` cached ones."""
    context = cached + q_len
    k_cache, v_cache, block_table = _paged_cache(num_seqs, context)
    seq_lens = torch.full((num_seqs,), context, dtype=torch.int32, device="cuda")
    qsl = torch.arange(0, num_seqs + 1, dtype=torch.int32, device="cuda") * q_len
    q = torch.randn(num_seqs * q_len, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    out = torch.empty_like(q)
    scale = HEAD_DIM**-0.5

    def ours():
        paged_prefill_attention(q, k_cache, v_cache, qsl, seq_lens, block_table, scale, q_len,
                                out=out, config=config)  # fmt: skip

    flops = _causal_flops(num_seqs, q_len, cached)
    ms = _median_ms(ours)
    row = {"requests": num_seqs, "q_len": q_len, "cached": cached, "ms": ms,
           "tflops": flops / ms / 1e9}  # fmt: skip
    if config is None:
        k = k_cache[block_table.long()].flatten(1, 2).transpose(1, 2).contiguous()
        v = v_cache[block_table.long()].flatten(1, 2).transpose(1, 2).contiguous()
        qh = q.view(num_seqs, q_len, NUM_HEADS, HEAD_DIM).transpose(1, 2)
        # Bottom-right causal alignment: the new queries are the last q_len positions.
        mask = causal_lower_right(q_len, context) if cached else None
        row["sdpa"] = {}
        for name, backend in SDPA_BACKENDS.items():
            try:
                with sdpa_kernel([backend]):
                    sdpa_ms = _median_ms(
                        lambda: F.scaled_dot_product_attention(
                            qh, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                            enable_gqa=True,
                        )
                    )  # fmt: skip
                row["sdpa"][name] = {"ms": sdpa_ms, "tflops": flops / sdpa_ms / 1e9}
            except RuntimeError as e:
                row["sdpa"][name] = {"error": str(e).splitlines()[0][:160]}
    return row


def sweep() -> dict:
    """Time candidate launch shapes; the defaults in the kernel files come from this table."""
    results = {"decode": [], "decode_splits": [], "prefill": []}
    for tile_n, warps, stages in [(64, 4, 2), (64, 4, 3), (32, 4, 2), (128, 4, 2), (64, 8, 2)]:
        for batch, context in [(1, 32768), (16, 4096), (64, 4096), (256, 1024)]:
            cfg = DecodeConfig(tile_n, warps, stages)
            try:
                row = bench_decode(batch, context, cfg, peers=False)
            except Exception as e:  # out of shared memory and the like: record, go on
                row = {"batch": batch, "context": context, "error": str(e)[:160]}
            results["decode"].append({"tile_n": tile_n, "warps": warps, "stages": stages, **row})
    base = default_decode_config(HEAD_DIM, DTYPE)
    for batch in (1, 4, 16, 64):
        for context in (1024, 8192, 32768):
            for splits in (1, 2, 4, 8, 16, 32, 64):
                if splits * base.tile_n > context:
                    continue
                cfg = DecodeConfig(base.tile_n, base.num_warps, base.num_stages, splits)
                row = bench_decode(batch, context, cfg, peers=False)
                results["decode_splits"].append({"splits": splits, **row})
            torch.cuda.empty_cache()
    for block_m, block_n, warps, stages in [
        (128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 2),
        (64, 64, 4, 3), (64, 32, 4, 2),
    ]:  # fmt: skip
        for shape in [(1, 8192, 0), (16, 1024, 0), (64, 512, 0)]:
            cfg = PrefillConfig(block_m, block_n, warps, stages)
            try:
                row = bench_prefill(*shape, config=cfg)
            except Exception as e:
                row = {"shape": shape, "error": str(e)[:160]}
            results["prefill"].append(
                {"block_m": block_m, "block_n": block_n, "warps": warps, "stages": stages, **row}
            )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON results")
    parser.add_argument("--sweep", action="store_true", help="time candidate launch shapes instead")
    parser.add_argument("--commit", help="commit to record when the copy has no .git")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # torch warns once per rejected SDPA backend; the JSON records each backend's error.
    warnings.simplefilter("ignore", UserWarning)
    torch.manual_seed(0)

    report = {"environment": environment(args.commit)}
    if args.sweep:
        report["sweep"] = sweep()
        (args.out / "attention_kernels_sweep.json").write_text(json.dumps(report, indent=2))
        print_sweep(report["sweep"])
        return 0
    report["copy_GBps"] = copy_bandwidth_gbps()
    report["read_GBps"] = read_bandwidth_gbps()
    report["matmul_bf16_tflops"] = matmul_tflops()
    report["defaults"] = {
        "decode": vars(default_decode_config(HEAD_DIM, DTYPE)),
        "prefill": vars(default_prefill_config(HEAD_DIM, DTYPE, 8192, NUM_HEADS // NUM_KV_HEADS)),
    }
    report["host_us"] = host_overheads()
    report["decode"] = []
    for batch in DECODE_BATCHES:
        for context in DECODE_CONTEXTS:
            row = bench_decode(batch, context)
            row["frac_of_copy_bw"] = row["kv_GBps"] / report["copy_GBps"]
            row["frac_of_read_bw"] = row["kv_GBps"] / report["read_GBps"]
            report["decode"].append(row)
            torch.cuda.empty_cache()
    report["prefill"] = []
    for shape in PREFILL_SHAPES:
        report["prefill"].append(bench_prefill(*shape))
        torch.cuda.empty_cache()
    (args.out / "attention_kernels.json").write_text(json.dumps(report, indent=2))
    print_summary(report)
    return 0


def _peer(row: dict, key: str) -> str:
    return " ".join(
        f"{name}={r[key]:.0f}" if key in r else f"{name}=n/a" for name, r in row["sdpa"].items()
    )


def print_summary(report: dict) -> None:
    """The short table a reader looks at first; the JSON holds everything."""
    env = report["environment"]
    print(
        f"\n{env['gpu']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}"
    )
    print(f"copy bandwidth {report['copy_GBps']:.0f} GB/s (read+write); "
          f"sum read bandwidth {report['read_GBps']:.0f} GB/s; "
          f"bf16 matmul {report['matmul_bf16_tflops']:.0f} TFLOP/s")  # fmt: skip
    print(f"host us per eager call: {report['host_us']}")
    print("\ndecode, CUDA-graph replay (KV read GB/s, % of copy / read bandwidth; SDPA same way)")
    for r in report["decode"]:
        print(f"  B={r['batch']:>3} ctx={r['context']:>5} splits={r['splits']:>2}: "
              f"{r['ms'] * 1e3:8.1f} us {r['kv_GBps']:6.0f} GB/s {100 * r['frac_of_copy_bw']:5.1f}% "
              f"{100 * r['frac_of_read_bw']:5.1f}%"
              f" (eager {r['eager_ms'] * 1e3:6.1f} us) | sdpa {_peer(r, 'kv_GBps')}")  # fmt: skip
    print("\nprefill (causal TFLOP/s; SDPA on contiguous K/V, TFLOP/s)")
    for r in report["prefill"]:
        print(f"  {r['requests']:>2} x {r['q_len']:>5} (+{r['cached']:>5} cached): "
              f"{r['ms']:7.3f} ms {r['tflops']:5.0f} TFLOP/s | sdpa {_peer(r, 'tflops')}")  # fmt: skip


def print_sweep(results: dict) -> None:
    """Each candidate launch shape's rate, one line each."""
    print("sweep: decode (tile_n, warps, stages) -> KV GB/s per (batch, context)")
    for r in results["decode"]:
        val = f"{r['kv_GBps']:.0f}" if "kv_GBps" in r else r.get("error", "")[:60]
        print(f"  {r['tile_n']:>3} {r['warps']} {r['stages']}  B={r['batch']} "
              f"ctx={r['context']}: {val}")  # fmt: skip
    for r in results["decode_splits"]:
        print(f"  splits={r['splits']:>3} B={r['batch']} ctx={r['context']}: "
              f"{r['kv_GBps']:.0f} GB/s {r['ms'] * 1e3:.1f} us")  # fmt: skip
    print("sweep: prefill (block_m, block_n, warps, stages) -> TFLOP/s")
    for r in results["prefill"]:
        val = f"{r['tflops']:.0f}" if "tflops" in r else r.get("error", "")[:60]
        shape = f"{r.get('requests')}x{r.get('q_len')}" if "tflops" in r else r.get("shape")
        print(f"  {r['block_m']:>3} {r['block_n']:>3} {r['warps']} {r['stages']} {shape}: {val}")


if __name__ == "__main__":
    raise SystemExit(main())
