"""Quantized weights on one GPU at a full-size architecture (random weights, quantized at
load): batch-1 decode tok/s and achieved bandwidth for bf16 (the peer), int8, int4 and fp8,
and offline 1000 x 128/128 output tok/s for bf16 and fp8 (plus int8/int4 with --all-offline).
Each scheme gets a fresh engine in this process; results go to --out/quant_summary.json after
every phase, so a run cut short keeps what it measured.

    python benchmarks/gpu/quant_engine.py --config benchmarks/gpu/model_configs/llama-3.1-8b.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from engine_h200 import commit, decode_bs1, model_dir, offline  # noqa: E402


def quantized_weight_bytes(cfg: dict, scheme: str | None) -> int:
    """Bytes a decode step reads for the weights: projections at the scheme's width (with
    their scales), embedding/lm_head and norms in bf16."""
    h, i, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // heads
    proj = L * (h * (heads * d + 2 * kv * d) + heads * d * h + 3 * h * i)
    width = {None: 2.0, "int8": 1.0, "fp8": 1.0, "int4": 0.5 + 3 / 128}[scheme]
    return int(proj * width + 2 * (L * 2 * h + h + cfg["vocab_size"] * h))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=HERE / "model_configs" / "llama-3.1-8b.json")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    ap.add_argument("--schemes", default="none,int8,int4,fp8")
    ap.add_argument("--offline", default="none,fp8", help="schemes that run 1000 x 128/128")
    ap.add_argument("--max-num-seqs", type=int, default=512)
    # vLLM's LLM class on GPUs of >= 70 GiB other than A100 (EngineArgs.get_batch_defaults):
    # max_num_seqs 1024, max_num_batched_tokens 16384 (its server: 1024 and 8192)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="the engine step's token budget (default: the engine's)")
    args = ap.parse_args()
    from soberana import LLM

    cfg = json.loads(args.config.read_text())
    path = model_dir(args.config)
    props = torch.cuda.get_device_properties(0)
    summary = {"commit": commit(), "gpu": props.name, "cc": list(torch.cuda.get_device_capability()),
               "torch": torch.__version__, "config": args.config.name,
               "max_num_seqs": args.max_num_seqs,
               "max_num_batched_tokens": args.max_num_batched_tokens, "results": {}}
    out = args.out / "quant_summary.json"
    budget = ({} if args.max_num_batched_tokens is None
              else {"max_num_batched_tokens": args.max_num_batched_tokens})  # fmt: skip
    for scheme in args.schemes.split(","):
        q = None if scheme == "none" else scheme
        t0 = time.time()
        try:
            llm = LLM(str(path), load_format="dummy", max_model_len=4096, quantization=q,
                      max_num_seqs=args.max_num_seqs, gpu_memory_utilization=0.85, **budget)
        except Exception as exc:  # a scheme this GPU refuses: record why, go on
            summary["results"][scheme] = {"error": f"{type(exc).__name__}: {exc}"}
            out.write_text(json.dumps(summary, indent=1))
            continue
        info = llm.engine.model_info
        res = {"load_s": time.time() - t0, "quantization": info.quantization,
               "kernels": info.quantization_kernels,
               "weight_GB_allocated": torch.cuda.memory_allocated() / 1e9}
        d = decode_bs1(llm, cfg, prompt_len=128, new_tokens=256)
        wb = quantized_weight_bytes(cfg, q)
        step = d["step_ms_p50"] / 1e3
        d["weight_bytes_per_token"] = wb
        d["achieved_GBps_weights"] = wb / step / 1e9
        if d.get("graph_replay_ms"):
            d["graph_GBps_weights"] = wb / (d["graph_replay_ms"] / 1e3) / 1e9
        res["decode_bs1"] = d
        summary["results"][scheme] = res
        out.write_text(json.dumps(summary, indent=1))
        print(scheme, json.dumps(res), flush=True)
        if scheme in args.offline.split(","):
            offline(llm, cfg, 64, 128, 16)  # warm-up: compile the batched kernels
            res["offline_1000x128_128"] = offline(llm, cfg, 1000, 128, 128)
            out.write_text(json.dumps(summary, indent=1))
            print(scheme, "offline", json.dumps(res["offline_1000x128_128"]), flush=True)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    base = summary["results"].get("none", {}).get("decode_bs1", {}).get("decode_bs1_tok_s")
    if base:
        summary["speedup_vs_bf16"] = {
            s: r["decode_bs1"]["decode_bs1_tok_s"] / base
            for s, r in summary["results"].items() if "decode_bs1" in r
        }
    out.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary.get("speedup_vs_bf16")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
