"""The decode fast-path kernels at Llama-3.1-8B shapes on one GPU, against what they replace.

- Few-row GEMVs (`soberana/ops/triton/gemv.py`) for each of `--rows` input rows (1: batch-1
  decode; 5: a verification of 4 drafts): qkv with add + RMSNorm fused in, o, gate/up with
  add + RMSNorm and SiLU-and-mul fused in, down. Peer, same run: cuBLAS through `F.linear`
  plus the separate Triton norm / SiLU kernels on the same rows.
- Fused decode attention (`triton/fused_decode_attention.py`: rotary, KV write, split-K attention and
  merge in one launch). Peer: the rotary, KV-write and split-K decode kernels it replaces.
Every time is per call of a CUDA graph of back-to-back calls (launch gaps as in the engine's
decode graph), rotating through enough weight copies that each call reads from HBM, not L2.
Bandwidth is the weight bytes (plus KV bytes for attention) over that time.

    python benchmarks/gpu/decode_kernels.py --out DIR [--sweep] [--commit SHA]
    # the few-row GEMVs alone, and their tile shapes per row count:
    python benchmarks/gpu/decode_kernels.py --out DIR --rows 1,2,4,5,8 --no-attention --sweep
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_kernels import _copies_beyond_l2, _graph_ms, environment, read_bandwidth_gbps  # noqa: E402

from soberana.ops.layers import RotaryEmbedding  # noqa: E402
from soberana.ops.triton import fused_decode_attention as fused_decode_module  # noqa: E402
from soberana.ops.triton.attention import (  # noqa: E402
    DecodeConfig,  # noqa: E402
    paged_decode_attention,
    reshape_and_cache,
)
from soberana.ops.triton.fused_decode_attention import fused_decode_attention  # noqa: E402
from soberana.ops.triton.gemv import GemvConfig, default_config, gemv  # noqa: E402
from soberana.ops.triton.layers import fused_add_rms_norm, rotary_embedding, silu_and_mul  # noqa: E402

DTYPE = torch.bfloat16
HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4096, 14336, 32, 8, 128, 16
QKV = (HEADS + 2 * KV_HEADS) * HEAD_DIM
# name: (rows of W, K, norm before, gated)
SHAPES = {"qkv": (QKV, HIDDEN, True, False), "o": (HIDDEN, HEADS * HEAD_DIM, False, False),
          "gate_up": (2 * INTER, HIDDEN, True, True), "down": (HIDDEN, INTER, False, False)}  # fmt: skip


def _rand(*shape):
    return torch.randn(*shape, device="cuda", dtype=DTYPE)


def _gemm_calls(name: str, cfg: GemvConfig | None, m: int = 1):
    """(ours, peer) call lists over weight copies that overflow L2 for `m` input rows, and
    bytes per call."""
    rows, k, norm, gated = SHAPES[name]
    nbytes = rows * k * 2
    copies = _copies_beyond_l2(nbytes)
    # At least 8 calls per graph, so the replay's own launch is a small share of the time.
    weights = [_rand(rows, k) * k**-0.5 for _ in range(copies)] * math.ceil(8 / copies)
    x, res, g = _rand(m, k), _rand(m, k), _rand(k)
    ours, peer = [], []
    for w in weights:
        if norm:
            ours.append(lambda w=w: gemv(x, w, norm_weight=g, residual=res, gated=gated,
                                         config=cfg))  # fmt: skip
        else:
            ours.append(lambda w=w: gemv(x, w, config=cfg))

        def unfused(w=w):
            h = fused_add_rms_norm(x, res, g, 1e-5)[0] if norm else x
            out = F.linear(h, w)
            return silu_and_mul(out) if gated else out

        peer.append(unfused)
    return ours, peer, nbytes


def bench_gemms(cfg: GemvConfig | None = None, m: int = 1) -> list[dict]:
    rows = []
    for name in SHAPES:
        ours, peer, nbytes = _gemm_calls(name, cfg, m)
        t_ours, t_peer = _graph_ms(ours), _graph_ms(peer)
        rows.append({"op": name, "rows": m, "weight_MB": nbytes / 1e6,
                     "config": vars(cfg or default_config(DTYPE, rows=m)),
                     "ours_us": t_ours * 1e3, "peer_us": t_peer * 1e3,
                     "ours_GBps": nbytes / t_ours / 1e6, "peer_GBps": nbytes / t_peer / 1e6,
                     "speedup": t_peer / t_ours})  # fmt: skip
        r = rows[-1]
        print(f"gemv {name:>8} rows {m} ours {r['ours_us']:7.1f} us ({r['ours_GBps']:5.0f} GB/s)"
              f"  cuBLAS+kernels {r['peer_us']:7.1f} us ({r['peer_GBps']:5.0f} GB/s)"
              f"  x{r['speedup']:.3f}", flush=True)  # fmt: skip
    return rows


def sweep_gemms(ops: list[str], m: int = 1) -> list[dict]:
    """Candidate tile shapes per op for `m` input rows; the best is what `default_config`
    should give. One row: [BLOCK_N, BLOCK_K] float32 lanes (chunk_k 1). Several: each
    thread sums chunk_k columns first, the accumulator is [ROWS, BLOCK_N, BLOCK_K / chunk_k]
    with ROWS = m padded to a power of two."""
    out = []
    padded = 1 << (m - 1).bit_length()
    if m == 1:  # pipeline depth made no difference at one row (H200)
        shapes = [(bn, bk, warps, stages, 1) for bn, bk, warps, stages in itertools.product(
            (4, 8, 16, 32), (256, 512, 1024), (4, 8), (1, 2, 3)) if 2048 <= bn * bk <= 16384]
    else:  # BLOCK_K a multiple of 32 x warps x chunk_k: the warps along K
        shapes = [(bn, 32 * warps * chunk, warps, 1, chunk)
                  for bn, warps, chunk in itertools.product((2, 4, 8), (4, 8), (4, 8, 16))]
    for name in ops:
        best = None
        gated = SHAPES[name][3]
        for bn, bk, warps, stages, chunk in shapes:
            acc_per_thread = padded * bn * (bk // chunk) // (32 * warps)
            if acc_per_thread * (2 if gated else 1) > 128 or SHAPES[name][1] % bk:
                continue  # spills for sure, or ragged K
            cfg = GemvConfig(bn, bk, warps, stages, chunk)
            try:
                ours, _, nbytes = _gemm_calls(name, cfg, m)
                t = _graph_ms(ours)
            except Exception as e:  # out of resources: not a candidate
                print(f"  {name} rows {m} {cfg}: {type(e).__name__}", flush=True)
                continue
            row = {"op": name, "rows": m, "config": vars(cfg), "us": t * 1e3,
                   "GBps": nbytes / t / 1e6}  # fmt: skip
            out.append(row)
            if best is None or row["us"] < best["us"]:
                best = row
        print(f"sweep {name:>8} rows {m} best {best['config']} {best['us']:.1f} us "
              f"({best['GBps']:.0f} GB/s)", flush=True)  # fmt: skip
    return out


def _attention_case(batch: int, context: int, table_width: int):
    nblocks = batch * math.ceil(context / BLOCK)
    k_cache = _rand(nblocks + 1, BLOCK, KV_HEADS, HEAD_DIM)
    v_cache = _rand(nblocks + 1, BLOCK, KV_HEADS, HEAD_DIM)
    table = torch.zeros(batch, table_width, dtype=torch.int32, device="cuda")
    perm = torch.randperm(nblocks, device="cuda").to(torch.int32).view(batch, -1)
    table[:, : perm.shape[1]] = perm
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    positions = (seq_lens - 1).long()
    slots = (table[:, (context - 1) // BLOCK].long() * BLOCK + (context - 1) % BLOCK)
    qkv = _rand(batch, QKV)
    rope = RotaryEmbedding(1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)),
                           table_width * BLOCK).cuda()  # fmt: skip
    return qkv, positions, rope, slots, k_cache, v_cache, seq_lens, table


def bench_attention_case(batch: int, context: int, max_model_len: int) -> dict:
    width = max(math.ceil(context / BLOCK), max_model_len // BLOCK)
    qkv, pos, rope, slots, kc, vc, lens, table = _attention_case(batch, context, width)
    scale = HEAD_DIM**-0.5

    def ours():
        return fused_decode_attention(qkv, pos, rope.cos, rope.sin, slots, kc, vc, lens, table,
                                      HEADS, scale)  # fmt: skip

    def peer():
        q = qkv[:, : HEADS * HEAD_DIM].view(batch, HEADS, HEAD_DIM)
        k = qkv[:, HEADS * HEAD_DIM : QKV - KV_HEADS * HEAD_DIM].view(batch, KV_HEADS, -1)
        v = qkv[:, QKV - KV_HEADS * HEAD_DIM :].view(batch, KV_HEADS, HEAD_DIM)
        q, k = rotary_embedding(pos, q, k, rope.cos, rope.sin)
        reshape_and_cache(k, v, kc, vc, slots)
        return paged_decode_attention(q, kc, vc, lens, table, scale)

    ref = peer().reshape(batch, -1).float()
    err = ((ours().float() - ref).norm() / ref.norm()).item()
    t_ours, t_peer = _graph_ms([ours] * 16), _graph_ms([peer] * 16)
    kv_bytes = batch * context * KV_HEADS * HEAD_DIM * 2 * 2
    r = {"batch": batch, "context": context, "table_tokens": width * BLOCK,
         "ours_us": t_ours * 1e3, "peer_us": t_peer * 1e3, "ours_GBps": kv_bytes / t_ours / 1e6,
         "speedup": t_peer / t_ours, "rel_err_vs_peer": err}  # fmt: skip
    print(f"attn b={batch:<3} ctx={context:<6} fused {r['ours_us']:7.1f} us  "
          f"rotary+write+split-K {r['peer_us']:7.1f} us  x{r['speedup']:.2f}  err {err:.1e}",
          flush=True)  # fmt: skip
    return r


def sweep_attention(cases: list[tuple[int, int]], max_model_len: int) -> list[dict]:
    """Tile width, pipeline depth and minimum tiles per partition of the fused decode kernel."""
    out = []
    for (batch, context), tile, stages, min_tiles in itertools.product(
        cases, (32, 64, 128), (2, 3), (1, 2, 4, 8)
    ):
        fused_decode_module._MIN_TILES = min_tiles
        width = max(math.ceil(context / BLOCK), max_model_len // BLOCK)
        qkv, pos, rope, slots, kc, vc, lens, table = _attention_case(batch, context, width)
        cfg = DecodeConfig(tile, 4, stages)

        def call(qkv=qkv, pos=pos, rope=rope, slots=slots, kc=kc, vc=vc, lens=lens, table=table,
                 cfg=cfg):  # fmt: skip
            return fused_decode_attention(qkv, pos, rope.cos, rope.sin, slots, kc, vc, lens,
                                          table, HEADS, HEAD_DIM**-0.5, config=cfg)  # fmt: skip

        try:
            t = _graph_ms([call] * 16)
        except Exception as e:
            print(f"  attn {batch} {context} {cfg} {min_tiles}: {type(e).__name__}", flush=True)
            continue
        out.append({"batch": batch, "context": context, "tile_n": tile, "num_stages": stages,
                    "min_tiles": min_tiles, "us": t * 1e3})  # fmt: skip
    for batch, context in cases:
        rows = [r for r in out if (r["batch"], r["context"]) == (batch, context)]
        best = min(rows, key=lambda r: r["us"])
        print(f"sweep attn b={batch} ctx={context}: best {best}", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sweep", action="store_true", help="also sweep the GEMM tile shapes")
    parser.add_argument("--sweep-ops", default=",".join(SHAPES),
                        help="the projections to sweep, comma-separated")
    parser.add_argument("--sweep-attention", action="store_true",
                        help="with --sweep, also the fused decode attention's tiles")
    parser.add_argument("--rows", default="1",
                        help="input rows of the GEMVs, comma-separated (1 to 8)")
    parser.add_argument("--no-attention", action="store_true",
                        help="the GEMVs only, not the fused decode attention")
    parser.add_argument("--commit", default=None)
    parser.add_argument("--max-model-len", type=int, default=8192,
                        help="block-table width the attention launch is sized for")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(args.commit), "read_bw_GBps": read_bandwidth_gbps()}
    print(f"read bandwidth {report['read_bw_GBps']:.0f} GB/s", flush=True)
    path = args.out / "decode_kernels.json"
    row_counts = [int(r) for r in args.rows.split(",")]
    sections = {
        "gemv": lambda: [r for m in row_counts for r in bench_gemms(m=m)],
        "attention": lambda: [
            bench_attention_case(b, ctx, args.max_model_len)
            for b, ctx in [(1, 256), (1, 1024), (1, 8192), (1, 32768), (8, 1024), (64, 1024),
                           (256, 512)]  # fmt: skip
        ],
    }
    if args.no_attention:
        del sections["attention"]
    if args.sweep:
        ops = args.sweep_ops.split(",")
        sections["sweep_gemv"] = lambda: [r for m in row_counts for r in sweep_gemms(ops, m)]
        if args.sweep_attention:
            sections["sweep_attention"] = lambda: sweep_attention(
                [(1, 256), (1, 1024), (1, 8192), (1, 32768), (8, 1024), (64, 1024)],
                args.max_model_len)  # fmt: skip
    for name, run in sections.items():
        report[name] = run()
        path.write_text(json.dumps(report, indent=1))  # kept if a later section is cut short
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
