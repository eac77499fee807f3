"""Where a batch-1 decode step's device time goes on the Llama-3.1-8B shape (random bf16
weights): torch.profiler over CUDA-graph replays and over the eager forward, kernels ranked by
total device time. Writes --out/profile_decode_bs1.txt.

    python benchmarks/gpu/profile_decode.py --out /tmp
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from engine_h200 import model_dir  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=HERE / "model_configs" / "llama-3.1-8b.json")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    args = ap.parse_args()
    from soberana import LLM, SamplingParams
    from soberana.engine.outputs import EngineCoreRequest

    llm = LLM(str(model_dir(args.config)), load_format="dummy", max_model_len=4096,
              max_num_seqs=8, kv_cache_gb=8)
    core = llm.engine
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, detokenize=False)
    core.add_request(EngineCoreRequest("p", list(range(100, 612)), params, time.time()))
    for _ in range(8):
        core.step()
    graphs = core.runner.graphs
    lines = []
    for name, fn in (("graph_replay_bs1", graphs.graphs[1].replay),
                     ("full_engine_step_bs1", core.step)):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30,
                                          max_name_column_width=90)
        lines += [f"==== {name} (20 iterations) ====", table]
    text = "\n".join(lines)
    (args.out / "profile_decode_bs1.txt").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
