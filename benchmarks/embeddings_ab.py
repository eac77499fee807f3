"""Embedding throughput of two source trees in one run: `soberana serve` from each tree (its
own PYTHONPATH), alternating, against sentence-transformers float32 in-process, on the same
sentences — what embeddings_cpu.py measures for one tree, for a change and its base on a
shared host whose load drifts.

Order: sentence-transformers, then `--rounds` rounds of every `--servers` entry in turn, then
sentence-transformers again. Each server run records the load average before it.

    python benchmarks/embeddings_ab.py --model /path/to/all-MiniLM-L6-v2 \\
        --trees main=/work/main,new=. --servers 'main:;new:;new:--quantization int8'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from embeddings_cpu import (  # noqa: E402
    ISA_ENV,
    corpus,
    cosine_min,
    run_sentence_transformers,
    run_server,
    start_server,
)
from offline_throughput import machine  # noqa: E402


def tree_commit(tree: Path) -> str:
    sha = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True,
                         text=True, check=True).stdout.strip()  # fmt: skip
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--", "soberana"],
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    return sha + ("+dirty" if dirty else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--num", type=int, default=2000)
    ap.add_argument("--lengths", default="8:256")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--trees", required=True, help="NAME=PATH,... (source trees)")
    ap.add_argument("--servers", required=True,
                    help="';'-separated NAME:FLAGS, one server each (extra `serve` flags)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="ab")
    args = ap.parse_args()
    trees = {name: Path(path).resolve() for name, path in
             (item.split("=", 1) for item in args.trees.split(","))}  # fmt: skip
    servers = [(name, flags) for name, flags in
               (item.split(":", 1) for item in args.servers.split(";"))]  # fmt: skip
    out_dir = Path(args.out)
    texts, tokens, texts_file = corpus(args.model, args.num, args.lengths, out_dir)
    result = {"trees": {name: {"path": str(p), "commit": tree_commit(p)} for name, p in trees.items()},
              "machine": machine(), "environment": {k: os.environ.get(k) for k in ISA_ENV},
              "model": args.model, "num_sentences": len(texts), "concurrency": args.concurrency,
              "sentences_per_request": 1, "encoding_format": "float",
              "tokens": tokens,
              "runs": []}  # fmt: skip
    st = run_sentence_transformers(args.model, texts_file, 32)
    reference = st["sample"]
    st_rate = [len(texts) / st["seconds"]]
    print(f"sentence-transformers float32: {st_rate[0]:.1f} sentences/s", flush=True)
    log = out_dir / ".embeddings_ab_server.log"
    for round_ in range(args.rounds):
        for name, flags in servers:
            os.environ["PYTHONPATH"] = str(trees[name])
            load = os.getloadavg()
            proc, url = start_server(args.model, log, "float32", shlex.split(flags))
            try:
                run = asyncio.run(run_server(url, texts, args.concurrency, 1, "float", "aiohttp"))
            finally:
                proc.terminate()
                proc.wait(30)
            rate = len(texts) / run["seconds"]
            result["runs"].append({
                "round": round_, "tree": name, "server_flags": flags, "load_avg_before": load,
                "sentences_per_s": rate, "vs_sentence_transformers_float32_first": rate / st_rate[0],
                "request_latency_s": run["latency_s"],
                "min_cosine_vs_sentence_transformers_float32": cosine_min(run["sample"], reference),
                "server_log": [line for line in log.read_text().splitlines()
                               if "Compute backend" in line or "Quantization" in line],
            })  # fmt: skip
            print(json.dumps({k: v for k, v in result["runs"][-1].items() if k != "server_log"}),
                  flush=True)
    again = run_sentence_transformers(args.model, texts_file, 32)
    st_rate.append(len(texts) / again["seconds"])
    result["sentence_transformers_float32_sentences_per_s"] = st_rate  # first, last
    mean_st = statistics.mean(st_rate)
    for run in result["runs"]:
        run["vs_sentence_transformers_float32_mean"] = run["sentences_per_s"] / mean_st
    result["load_avg_at_end"] = os.getloadavg()
    for f in (texts_file, texts_file + ".st.json"):
        os.unlink(f)
    (out_dir / f"embeddings_{args.tag}.json").write_text(json.dumps(result, indent=1))
    summary = {}
    for run in result["runs"]:
        summary.setdefault(f"{run['tree']} {run['server_flags']}".strip(), []).append(
            round(run["sentences_per_s"], 1))
    print(json.dumps({"sentence_transformers_float32": [round(r, 1) for r in st_rate],
                      "servers": summary}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
