"""Time to ready of `LLM()` (the default model) on CPU, by phase, in fresh processes.

Each run is a new Python process (imports included) that builds `LLM(<model>)` and answers one
chat request; the engine's own start-up log lines give the phases. The first run may build the
native kernels (cached after it); the runs after it are what a user sees on every later start.

    python benchmarks/cpu_startup.py --runs 3 --output benchmarks/results/cpu_startup_zen4.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_throughput import commit, machine  # noqa: E402

CHILD = r"""
import logging, sys, time
t0 = time.perf_counter()
logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                    format="%(relativeCreated)d ms %(name)s: %(message)s")
from soberana.engine.llm import LLM
from soberana.engine.sampling_params import SamplingParams
t_import = time.perf_counter()
model = sys.argv[1] if sys.argv[1] != "default" else None
llm = LLM(model, **eval(sys.argv[2]))
t_ready = time.perf_counter()
out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
               SamplingParams(max_tokens=16, temperature=0))
t_answer = time.perf_counter()
print("RESULT", {"import_s": t_import - t0, "ready_s": t_ready - t0,
                 "llm_init_s": t_ready - t_import, "first_answer_s": t_answer - t_ready,
                 "answer": out[0].outputs[0].text, "dtype": llm.engine.model_info.dtype,
                 "model": llm.engine.model_info.name})
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--kwargs", default="{}", help="LLM keyword arguments, a Python dict")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()
    runs = []
    for _ in range(args.runs):
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, args.model, args.kwargs],
                              capture_output=True, text=True, env=dict(os.environ))  # fmt: skip
        wall = time.perf_counter() - t
        log = [line for line in proc.stdout.splitlines() if not line.startswith("RESULT")]
        result = next((eval(line[7:]) for line in proc.stdout.splitlines()
                       if line.startswith("RESULT")), {"error": proc.stderr[-2000:]})  # fmt: skip
        result["process_wall_s"] = wall
        result["log"] = [line for line in log if "Start-up" in line or "engine ready" in line
                         or "CPU kernels" in line or "KV cache" in line or "Built" in line
                         or "Default model" in line or "dtype auto" in line]  # fmt: skip
        runs.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "log"}), *result["log"],
              sep="\n")  # fmt: skip
    report = {"benchmark": "cpu_startup", "commit": commit(), "machine": machine(),
              "model": args.model, "kwargs": args.kwargs, "runs": runs}  # fmt: skip
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
