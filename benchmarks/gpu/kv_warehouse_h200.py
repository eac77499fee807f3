"""The KV warehouse on one GPU with the Llama-3.1-8B body: transfer rates, then multi-round QA.

The vocabulary is the demo tokenizer's (934 ids) instead of 128,256, so every generated id
decodes to text and TTFT is measurable over HTTP; prefill cost is the 32 layers', which the
vocabulary barely touches. Writes into $OUT:

1. `kv_transfer_h200.json`: benchmarks/gpu/kv_transfer.py (load/store GB/s, 8B block layout).
2. `kv_warehouse_multiturn_h200_pool2gb.json`: run 4's setting (2 GB KV pool, 16 users x 4
   rounds, 512 system + 3072 history + 64 question tokens, 16-token answers, closed loop of
   4). Its pool holds 953 blocks of 16 tokens, fewer than four ~3.7k-token conversations
   need, so a fourth request waits for one to finish with the warehouse on or off.
3. `kv_warehouse_multiturn_h200_pool4gb.json`: a 4 GB pool (room for the closed loop's four
   conversations) and 32 users, so the live working set (32 x ~3.9k tokens, ~16 GB) is still
   4x the pool; closed loop of 4, then open-loop runs at `--rates` req/s of 16 users x 4
   rounds each (new conversations per run). Host RAM tier only (24 GB, LRU).

4. `kv_warehouse_multiturn_h200_long.json` (`--only long`): 12,288-token histories, 16 users
   (~26 GB live) against a 4 GB pool and a 40 GB host tier; closed loop of 4, then open loop.
5. `kv_warehouse_multiturn_h200_long_threshold.json` (`--only long_threshold`): the same with
   `--long-prefill-token-threshold 2048` on both sides.
6. `kv_warehouse_multiturn_h200_long_fp8kv.json` (`--only long_fp8kv`): part 4 with
   `--kv-cache-dtype fp8` on both sides: the same 4 GB pool holds twice the tokens; run it
   with `long` in one call for the bf16-KV peer.
Each multi-round file has warehouse off and on, same workload, and
`ttft_returning_speedup` per load. `--only` picks parts (transfer, pool2gb, pool4gb, long).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from engine_h200 import demo_vocab_model_dir  # noqa: E402


def shape(history: int) -> list[str]:
    """Multi-round QA: 4 rounds, a 512-token system prompt, `history` tokens per user."""
    return ["--rounds", "4", "--system-prompt-len", "512", "--history-len", str(history),
            "--question-len", "64", "--answer-len", "16", "--concurrency", "4",
            "--max-model-len", str(max(8192, 2 * history)), "--skip-replicas"]  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="transfer,pool2gb,pool4gb",
                    help="parts to run: transfer, pool2gb, pool4gb, long, long_threshold, "
                         "long_fp8kv")
    ap.add_argument("--rates", default="3,6", help="open-loop request rates for pool4gb")
    ap.add_argument("--long-rates", default="1", help="open-loop request rates for long")
    ap.add_argument("--rates-if-started-by-s", type=float, default=200.0,
                    help="skip the open-loop runs when pool4gb starts later than this (keeps "
                    "the whole command near 6 minutes)")
    args = ap.parse_args()
    start = time.monotonic()
    parts = set(args.only.split(","))
    out = Path(os.environ.get("OUT", "/tmp"))
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    if "transfer" in parts:
        cmd = [sys.executable, str(HERE / "kv_transfer.py"),
               "--output", str(out / "kv_transfer_h200.json")]  # fmt: skip
        failed |= subprocess.run(cmd).returncode
    path = demo_vocab_model_dir(HERE / "model_configs" / "llama-3.1-8b.json")
    bench = [sys.executable, str(HERE.parent / "kv_warehouse_multiturn.py"), "--model",
             str(path), "--load-format", "dummy"]  # fmt: skip
    if "pool2gb" in parts:
        cmd = bench + shape(3072) + ["--kv-cache-gb", "2", "--kv-offload-gb", "24", "--users", "16",
                       "--output", str(out / "kv_warehouse_multiturn_h200_pool2gb.json")]
        failed |= subprocess.run(cmd).returncode
    if "pool4gb" in parts:
        rates = args.rates
        if time.monotonic() - start > args.rates_if_started_by_s:
            print(f"pool4gb starts after {time.monotonic() - start:.0f} s: no open-loop runs")
            rates = ""
        cmd = bench + shape(3072) + ["--kv-cache-gb", "4", "--kv-offload-gb", "24",
                                     "--no-kv-disk", "--users", "32", "--open-loop-users", "16", "--request-rates", rates,
                       "--output", str(out / "kv_warehouse_multiturn_h200_pool4gb.json")]
        failed |= subprocess.run(cmd).returncode
    long_extra = {"long": [], "long_threshold": ["--extra-serve-args=--long-prefill-token-threshold 2048"],
                  "long_fp8kv": ["--extra-serve-args=--kv-cache-dtype fp8"]}  # fmt: skip
    for part, extra in long_extra.items():
        if part not in parts:
            continue
        # Longer histories (12k tokens, ~1.6 GB of KV per user): the shape agent sessions
        # reach, where recomputing costs most. 16 users (~26 GB live) against a 4 GB pool.
        # long_threshold: the same with --long-prefill-token-threshold 2048 on both sides, so
        # a returning user is not held behind another user's 8k-token prefill chunk.
        # long_fp8kv: FP8 keys and values, twice the blocks in the same 4 GB.
        cmd = bench + shape(12288) + extra + [
            "--kv-cache-gb", "4", "--kv-offload-gb", "40", "--no-kv-disk", "--users", "16",
            "--open-loop-users", "8", "--request-rates", args.long_rates,
            "--output", str(out / f"kv_warehouse_multiturn_h200_{part}.json")]  # fmt: skip
        failed |= subprocess.run(cmd).returncode
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
