"""Where a returning user's time to first token goes, in the engine alone (no HTTP, no API
process): the Llama-3.1-8B body, a 4 GB KV pool, a host-RAM warehouse.

Users' first turns (12,288-token histories by default) fill the pool several times over, so
their blocks are evicted to host RAM. Then each user returns, alone on the engine, with a
question of 64 new tokens and `max_tokens=1`; the wall time of that `generate` call is the
engine's TTFT. Three cases, same prompts:

  - `recompute`: no warehouse; the history is prefilled again;
  - `warehouse`: the history comes back from host RAM;
  - `gpu_hit`: the same returning prompt again at once, its blocks still in the GPU pool: the
    floor, what is left when nothing is loaded or recomputed.

One returning turn of the warehouse case also runs under cProfile, to see the host time.
Writes `kv_returning_timeline.json` (and the profile as text) into $OUT.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from engine_h200 import demo_vocab_model_dir  # noqa: E402


def returning_ttfts(llm, prompts: list[list[int]], question: int, profile: bool) -> dict:
    from soberana import SamplingParams

    rng = random.Random(1)
    first = llm.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))
    back, floor, stats = [], [], None
    prof_text = None
    for i, out in enumerate(first):
        prompt = (out.prompt_token_ids + list(out.outputs[0].token_ids)
                  + [rng.randrange(10, 900) for _ in range(question)])
        params = SamplingParams(max_tokens=1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        prof = cProfile.Profile() if profile and i == 1 else None
        t0 = time.perf_counter()
        if prof is not None:
            prof.enable()
        llm.generate([prompt], params, use_tqdm=False)
        if prof is not None:
            prof.disable()
        back.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        floor.append((time.perf_counter() - t0) * 1e3)
        if prof is not None:
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(45)
            prof_text = s.getvalue()
    offload = getattr(llm.engine, "offload", None)
    if offload is not None:
        w = offload.warehouse.stats()
        stats = {"loads": w.loads, "blocks_loaded": w.blocks_loaded,
                 "load_latency_s_sum": w.load_latency_sum, "puts": w.puts,
                 "puts_dropped": w.puts_dropped}
    return {"returning_ms": back, "gpu_hit_ms": floor, "warehouse": stats, "profile": prof_text}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--history", type=int, default=12288)
    ap.add_argument("--question", type=int, default=64)
    ap.add_argument("--kv-cache-gb", type=float, default=4.0)
    ap.add_argument("--offload-gb", type=float, default=40.0)
    ap.add_argument("--config", type=Path, default=HERE / "model_configs" / "llama-3.1-8b.json")
    args = ap.parse_args()
    from soberana import LLM
    from soberana.kv.config import KVWarehouseConfig

    path = demo_vocab_model_dir(args.config)
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 900) for _ in range(args.history)] for _ in range(args.users)]
    result = {"benchmark": "kv_returning_timeline", "commit": os.environ.get("SOBERANA_COMMIT"),
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    for case, warehouse in (("recompute", None),
                            ("warehouse", KVWarehouseConfig(offload_gb=args.offload_gb, load_policy="always"))):
        llm = LLM(str(path), load_format="dummy", kv_cache_gb=args.kv_cache_gb,
                  max_model_len=2 * args.history, max_num_seqs=64, kv_warehouse=warehouse)
        r = returning_ttfts(llm, prompts, args.question, profile=warehouse is not None)
        prof = r.pop("profile")
        if prof:
            (Path(os.environ.get("OUT", "/tmp")) / "kv_returning_profile.txt").write_text(prof)
        result[case] = r
        med = sorted(r["returning_ms"])[len(r["returning_ms"]) // 2]
        hit = sorted(r["gpu_hit_ms"])[len(r["gpu_hit_ms"]) // 2]
        print(f"{case}: returning p50 {med:.1f} ms, gpu hit p50 {hit:.1f} ms, {r['warehouse']}")
        llm.engine.shutdown()
        del llm
    out = Path(os.environ.get("OUT", "/tmp")) / "kv_returning_timeline.json"
    out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
