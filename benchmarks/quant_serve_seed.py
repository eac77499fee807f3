"""The seed workload through `soberana serve`, int8 weight-only against the unquantized model.

For each configuration (default: bf16, then `--quantization int8` on bf16 activations) this
starts `soberana serve MODEL` on a free port, waits for /health, runs

    soberana bench --num-prompts 100 --concurrency 10 --percentiles 50,95,99 --ignore-eos ...

with its own outputs (requests.csv, summary.json, latency_hist.png and the terminal table)
under OUT/<config>/, stops the server, and finally writes `soberana bench compare` of the two
summaries to OUT/compare.txt. Each configuration runs under the machine-wide bench lock
(--lock) on its own, with the commit, CPU and load average before and after in OUT/run.json.

    python benchmarks/quant_serve_seed.py --out benchmarks/results/quant_seed_smollm2_cpu
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CONFIGS = {
    "bf16": ["--dtype", "bfloat16"],
    "int8": ["--dtype", "bfloat16", "--quantization", "int8"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 600.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"soberana serve exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise SystemExit(f"soberana serve was not ready within {timeout:.0f} s")


def cpu_info() -> dict:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
                 platform.processor())  # fmt: skip
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    return {"cpu": model, "cpus": os.cpu_count(),
            "cpu_flags": [f for f in flags if f.startswith(("avx512", "avx2", "amx", "fma"))]}  # fmt: skip


def run_config(name: str, args: argparse.Namespace, out: Path) -> dict:
    port = free_port()
    log = open(out / f"{name}_serve.log", "w")
    serve = subprocess.Popen(
        [sys.executable, "-m", "soberana.cli", "serve", args.model, "--port", str(port),
         "--max-model-len", str(args.input_len + args.output_len + 64),
         "--max-num-seqs", "16", *CONFIGS[name]],
        stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_ready(port, serve)
        info = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models").read())
        load_before = os.getloadavg()
        bench = subprocess.run(
            [sys.executable, "-m", "soberana.cli", "bench", "--base-url",
             f"http://127.0.0.1:{port}/v1", "--num-prompts", "100", "--concurrency", "10",
             "--input-len", str(args.input_len), "--output-len", str(args.output_len),
             "--ignore-eos", "--seed", "0", "--percentiles", "50,95,99", "--no-progress",
             "--tokenizer", args.model, "--output-dir", str(out / name)],
            capture_output=True, text=True)  # fmt: skip
        load_after = os.getloadavg()
        (out / name / "terminal.txt").write_text(bench.stdout + bench.stderr)
        if bench.returncode != 0:
            raise SystemExit(f"soberana bench failed for {name}:\n{bench.stderr[-2000:]}")
        print(bench.stdout, flush=True)
        return {"serve_flags": CONFIGS[name], "models": info["data"],
                "load_average_before": load_before, "load_average_after": load_after}
    finally:
        serve.terminate()
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            serve.kill()
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/work/models/hf/SmolLM2-135M-Instruct")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--lock", type=Path, default=Path("/work/notes/bench.lock"),
                    help="file locked (flock) around each configuration's run")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    run = {"model": args.model, "commit": commit.strip(), **cpu_info(),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "input_len": args.input_len,
           "output_len": args.output_len, "configs": {}}  # fmt: skip
    names = args.configs.split(",")
    for name in names:
        with open(args.lock, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            run["configs"][name] = run_config(name, args, args.out)
        (args.out / "run.json").write_text(json.dumps(run, indent=1))
    if len(names) == 2:
        cmp = subprocess.run(
            [sys.executable, "-m", "soberana.cli", "bench", "compare",
             str(args.out / names[0] / "summary.json"), str(args.out / names[1] / "summary.json")],
            capture_output=True, text=True)  # fmt: skip
        (args.out / "compare.txt").write_text(cmp.stdout + cmp.stderr)
        print(cmp.stdout)


if __name__ == "__main__":
    main()
