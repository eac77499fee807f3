"""The KV warehouse multi-round benchmark on one GPU with the Llama-3.1-8B body.

The vocabulary is the demo tokenizer's (934 ids) instead of 128,256, so every generated id
decodes to text and TTFT is measurable over HTTP; prefill cost is the 32 layers', which the
vocabulary barely touches. Runs benchmarks/kv_warehouse_multiturn.py (warehouse off, then on,
same workload) with a GPU KV pool several times smaller than the live working set.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from engine_h200 import model_dir  # noqa: E402


def main() -> int:
    cfg_path = HERE / "model_configs" / "llama-3.1-8b.json"
    cfg = json.loads(cfg_path.read_text())
    from soberana.models.loader import resolve_model_path

    demo = json.loads((resolve_model_path(None) / "config.json").read_text())
    cfg.update(vocab_size=demo["vocab_size"], bos_token_id=demo["bos_token_id"],
               eos_token_id=demo["eos_token_id"])
    tmp = Path(os.environ.get("OUT", "/tmp")) / "llama8b-demo-vocab.json"
    tmp.write_text(json.dumps(cfg))
    path = model_dir(tmp)
    tmp.unlink()
    import kv_warehouse_multiturn

    out = Path(os.environ.get("OUT", "/tmp")) / "kv_warehouse_multiturn_h200.json"
    sys.argv = ["kv_warehouse_multiturn.py", "--model", str(path), "--load-format", "dummy",
                "--kv-cache-gb", "2", "--kv-offload-gb", "40", "--users", "16",
                "--rounds", "4", "--system-prompt-len", "512", "--history-len", "3072",
                "--question-len", "64", "--answer-len", "16", "--concurrency", "4",
                "--max-model-len", "8192", "--output", str(out)]
    return kv_warehouse_multiturn.main()


if __name__ == "__main__":
    sys.exit(main())
