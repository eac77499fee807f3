"""Structured outputs on one GPU at a full-size architecture (random bf16 weights): output
tok/s of 64 concurrent json_schema requests against the same 64 requests unconstrained, in
one engine, rounds alternating; plus the host time of each step's token mask.

Both kinds generate exactly --max-tokens tokens (unconstrained: ignore_eos; constrained: a
schema whose one string must be longer than that), from fresh random prompts each run (no
prefix-cache hits), so the difference is what the grammar costs per token: the mask computed
on a host thread during the forward pass, its upload and application in the sampler, and
the synchronous step a constrained batch needs. The vocabulary is the architecture's full
one (the demo tokenizer's ids, the rest never allowed by the grammar), so the bitmask has
the real size.

    python benchmarks/gpu/structured_gpu.py --config benchmarks/gpu/model_configs/llama-3.1-8b.json --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from engine_h200 import commit, model_dir  # noqa: E402

LONG_STRING = {"type": "object", "properties": {"text": {"type": "string", "minLength": 4000}},
               "required": ["text"], "additionalProperties": False}


def _sync() -> None:
    if torch.cuda.is_available():  # (a CPU smoke run of the script has nothing to wait for)
        torch.cuda.synchronize()


def one_run(llm, n: int, input_len: int, max_tokens: int, constrained: bool, seed: int,
            vocab: int) -> dict:
    from soberana import SamplingParams
    from soberana.structured.params import StructuredOutputsParams

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (input_len,), generator=g).tolist() for _ in range(n)]
    extra = ({"structured_outputs": StructuredOutputsParams(json=LONG_STRING)} if constrained
             else {"ignore_eos": True})
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens,
                            detokenize=False, **extra)
    manager = llm.engine.structured
    fill, fills = manager._fill, []

    def timed_fill(*args):  # the host thread's mask time per step
        t = time.perf_counter()
        out = fill(*args)
        fills.append(time.perf_counter() - t)
        return out

    manager._fill = timed_fill
    _sync()
    t0 = time.perf_counter()
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        manager._fill = fill
    _sync()
    dt = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    result = {"constrained": constrained, "seconds": dt, "output_tokens": tokens,
              "output_tok_s": tokens / dt}
    if fills:
        ms = sorted(1e3 * f for f in fills)
        result["mask_ms"] = {"n": len(ms), "p50": ms[len(ms) // 2],
                             "p99": ms[min(len(ms) - 1, int(0.99 * len(ms)))], "max": ms[-1]}
    if constrained:  # every answer must be the schema's JSON, cut by max_tokens
        texts = [o.outputs[0].token_ids for o in outs]
        result["all_hit_max_tokens"] = all(len(t) == max_tokens for t in texts)
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=HERE / "model_configs" / "llama-3.1-8b.json")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from soberana import LLM
    from soberana.models.loader import resolve_model_path

    path = model_dir(args.config)
    demo_vocab = json.loads((resolve_model_path("demo") / "config.json").read_text())["vocab_size"]
    gpu = torch.cuda.get_device_properties(0).name if torch.cuda.is_available() else "cpu"
    summary = {"commit": commit(), "gpu": gpu, "torch": torch.__version__,
               "config": args.config.name, "concurrency": args.concurrency,
               "input_len": args.input_len, "max_tokens": args.max_tokens, "runs": []}
    llm = LLM(str(path), load_format="dummy", max_model_len=2048,
              max_num_seqs=args.concurrency, gpu_memory_utilization=0.85,
              **({} if torch.cuda.is_available() else {"kv_cache_gb": 0.2}))
    one_run(llm, 8, 16, 8, True, 1, demo_vocab)  # warm-up: grammar compiler, first shapes
    one_run(llm, 8, 16, 8, False, 2, demo_vocab)
    out = args.out / "structured_gpu.json"
    for r in range(args.rounds):
        for constrained in (False, True):
            run = one_run(llm, args.concurrency, args.input_len, args.max_tokens, constrained,
                          1000 + 2 * r + constrained, demo_vocab)
            print(json.dumps(run), flush=True)
            summary["runs"].append(run)
            out.write_text(json.dumps(summary, indent=2))
    free = [x["output_tok_s"] for x in summary["runs"] if not x["constrained"]]
    held = [x["output_tok_s"] for x in summary["runs"] if x["constrained"]]
    summary["slowdown_best_pct"] = 100 * (1 - max(held) / max(free))
    summary["slowdown_median_pct"] = 100 * (1 - sorted(held)[len(held) // 2]
                                            / sorted(free)[len(free) // 2])
    out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
