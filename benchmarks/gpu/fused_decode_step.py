"""Batch-1 decode of the Llama-3.1-8B architecture (random bf16 weights) with the layers' torch
chains and with the fused Triton kernels, in one engine and one run.

Modes, measured in this order on the same engine (the decode CUDA graph is re-captured
after each switch; prefix caching is off so every mode computes its own prompt):
  torch     the PyTorch norms, rotary and SiLU of `soberana/ops/layers.py`, cuBLAS projections and
            the separate rotary / KV-write / split-K attention kernels
  fused     the fused elementwise kernels (add + RMSNorm, rotary, SiLU-and-mul) between
            cuBLAS projections: 13 launches per layer
  fast      the decode fast path: batch-1 GEMVs with the norms and SiLU-and-mul fused in and
            the fused decode attention, 5 launches per layer (the engine's default)
For each: the median engine step (ends with the sampled id read back, as engine_h200.py
times it), the forward's CUDA-graph replay alone, achieved GB/s, and the greedy tokens.

    python benchmarks/gpu/fused_decode_step.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from engine_h200 import HERE, kv_bytes_per_token, model_dir, weight_bytes  # same folder
from triton.testing import do_bench

from soberana import LLM, SamplingParams
from soberana.engine.outputs import EngineCoreRequest
from soberana.ops import layers
from soberana.ops.backend import with_kernels

PROMPT_LEN, NEW_TOKENS = 128, 256


def decode(llm: LLM, prompt: list[int], request_id: str) -> dict:
    """Greedy batch-1 decode of NEW_TOKENS after `prompt`; per-step times and the tokens."""
    core = llm.engine
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True,
                            detokenize=False)  # fmt: skip
    core.add_request(EngineCoreRequest(request_id, prompt, params, time.time()))
    tokens = [t for o in core.step() for t in o.new_token_ids]  # prefill + first token
    times = []
    while core.has_unfinished_requests():
        start = time.perf_counter()
        outs = core.step()
        times.append(time.perf_counter() - start)
        tokens += [t for o in outs for t in o.new_token_ids]
    times.sort()
    graph = llm.engine.runner.graphs.graphs[1]
    replay_ms = do_bench(graph.replay, warmup=25, rep=200, return_mode="median")
    return {"step_ms_p50": times[len(times) // 2] * 1e3,
            "step_ms_p90": times[int(0.9 * len(times))] * 1e3,
            "graph_replay_ms": replay_ms, "tokens": tokens}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=HERE / "model_configs" / "llama-3.1-8b.json")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(args.config.read_text())
    prompt = torch.randint(0, cfg["vocab_size"], (PROMPT_LEN,),
                           generator=torch.Generator().manual_seed(0)).tolist()  # fmt: skip
    nbytes = weight_bytes(cfg) + (PROMPT_LEN + NEW_TOKENS / 2) * kv_bytes_per_token(cfg)

    llm = LLM(str(model_dir(args.config)), load_format="dummy", max_model_len=1024,
              max_num_seqs=1, kv_cache_gb=2, enable_prefix_caching=False)  # fmt: skip
    model = llm.engine.worker.model
    fast = model.kernels  # the Triton backend, chosen at start
    fused = with_kernels(fast, gemv=None, fused_decode_attention=None)
    modes = {  # the torch chains around Triton attention; + fused layers; + the fast path
        "torch": with_kernels(fused, rms_norm=layers.torch_rms_norm,
                              add_rms_norm=layers.torch_add_rms_norm,
                              head_rms_norm=layers.torch_rms_norm,
                              rotary_embedding=layers.torch_rotary_embedding,
                              silu_and_mul=layers.torch_silu_and_mul),
        "fused": fused, "fast": fast,
    }  # fmt: skip
    results = {"model": args.config.stem, "gpu": torch.cuda.get_device_name(),
               "bytes_per_token": nbytes}  # fmt: skip
    for mode, kernels in modes.items():
        model.use_kernels(kernels)
        llm.engine.runner.graphs.capture()  # the graph of this mode's kernels
        r = decode(llm, prompt, mode)
        r["tok_s"] = 1e3 / r["step_ms_p50"]
        r["achieved_GBps"] = nbytes / r["step_ms_p50"] / 1e6
        reference = results.get("torch", r)["tokens"]
        first_diff = next((i for i, (a, b) in enumerate(zip(r["tokens"], reference)) if a != b),
                          None)  # fmt: skip
        r["first_token_differing_from_torch"] = first_diff
        results[mode] = r
        print(f"{mode:>8}: step p50 {r['step_ms_p50']:.3f} ms ({r['tok_s']:.1f} tok/s, "
              f"{r['achieved_GBps']:.0f} GB/s), forward graph replay "
              f"{r['graph_replay_ms']:.3f} ms, "
              f"first token differing from torch: {first_diff}", flush=True)  # fmt: skip
    (args.out / "fused_decode_step.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
