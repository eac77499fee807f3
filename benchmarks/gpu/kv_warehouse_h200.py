"""The KV warehouse multi-round benchmark on one GPU with the Llama-3.1-8B body.

The vocabulary is the demo tokenizer's (934 ids) instead of 128,256, so every generated id
decodes to text and TTFT is measurable over HTTP; prefill cost is the 32 layers', which the
vocabulary barely touches. Runs benchmarks/kv_warehouse_multiturn.py (warehouse off, then on,
same workload) with a GPU KV pool several times smaller than the live working set.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from engine_h200 import demo_vocab_model_dir  # noqa: E402


def main() -> int:
    path = demo_vocab_model_dir(HERE / "model_configs" / "llama-3.1-8b.json")
    import kv_warehouse_multiturn

    out = Path(os.environ.get("OUT", "/tmp")) / "kv_warehouse_multiturn_h200.json"
    sys.argv = ["kv_warehouse_multiturn.py", "--model", str(path), "--load-format", "dummy",
                "--kv-cache-gb", "2", "--kv-offload-gb", "40", "--users", "16",
                "--rounds", "4", "--system-prompt-len", "512", "--history-len", "3072",
                "--question-len", "64", "--answer-len", "16", "--concurrency", "4",
                "--max-model-len", "8192", "--output", str(out),
                # A 2 MB block per 16 tokens: the default 256 MB staging (128 blocks) drops
                # evicted blocks when a long prompt's admission evicts hundreds at once.
                "--extra-serve-args", "--kv-write-buffer-mb 4096"]
    return kv_warehouse_multiturn.main()


if __name__ == "__main__":
    sys.exit(main())
