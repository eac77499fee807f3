"""`soberana serve` on one GPU driven by `soberana bench` over HTTP (random bf16 weights):
(c) 1000 x 128/128 at saturation, as a fraction of offline `LLM.generate` measured in the
same run (engine_h200.py's summary, passed with --offline-summary); TTFT/TPOT percentiles at
concurrency 1, 16, 64 and 256 for 1024 in / 128 out.

    python benchmarks/gpu/server_h200.py --offline-summary $OUT/summary_llama-3.1-8b.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = Path(tempfile.mkdtemp(prefix="server-h200-"))  # the bench's per-run folders
sys.path.insert(0, str(HERE))
from engine_h200 import demo_vocab_model_dir, model_dir  # noqa: E402  (same folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(path: Path, log: Path, max_num_seqs: int) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    t0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "soberana.cli", "serve", str(path), "--port", str(port),
         "--load-format", "dummy", "--max-model-len", "4096", "--max-num-seqs", str(max_num_seqs),
         "--max-waiting-requests", "100000"],
        stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    while time.time() - t0 < 300:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url, time.time() - t0
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(log.read_text()[-3000:])
        time.sleep(0.5)
    raise RuntimeError("server not ready in 300 s")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def bench(url: str, tokenizer: Path, out: Path, *args: str) -> dict:
    cmd = [sys.executable, "-m", "soberana.cli", "bench", "--base-url", url + "/v1",
           "--endpoint", "completions", "--workload", "random", "--ignore-eos",
           "--tokenizer", str(tokenizer), "--no-progress", "--output-dir", str(out), *args]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=400)
    return json.loads((out / "summary.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=HERE / "model_configs" / "llama-3.1-8b.json")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    ap.add_argument("--offline-summary", type=Path, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--latency-only", action="store_true", help="only the TTFT/TPOT sweep")
    args = ap.parse_args()
    result: dict = {"model": args.config.stem, "max_num_seqs": args.max_num_seqs}
    out_file = args.out / f"server_{args.config.stem}.json"
    if not args.latency_only:
        throughput(args, result, out_file)
    latency_sweep(args, result, out_file)
    if args.offline_summary and args.offline_summary.is_file():
        offline = json.loads(args.offline_summary.read_text()).get("offline_128x128_out_tok_s")
        result["offline_128x128_out_tok_s"] = offline
        if offline and "http_128x128_out_tok_s" in result:
            result["server_frac_of_offline"] = result["http_128x128_out_tok_s"] / offline
            print("server_frac_of_offline", result["server_frac_of_offline"], flush=True)
    out_file.write_text(json.dumps(result, indent=2))
    return 0


def throughput(args: argparse.Namespace, result: dict, out_file: Path) -> None:
    """(c): 1000 x 128/128 at saturation over HTTP, full vocabulary."""
    path = model_dir(args.config)
    proc, url, ready_s = start_server(path, args.out / "server.log", args.max_num_seqs)
    result["server_ready_s"] = ready_s
    try:
        # Distinct --seed per run: a repeated prompt set would be served from the prefix cache.
        bench(url, path, WORK / "warmup", "--input-len", "128", "--output-len", "8",
              "--num-prompts", "300", "--concurrency", "256", "--seed", "101")
        s = bench(url, path, WORK / "c128x128", "--input-len", "128", "--output-len", "128",
                  "--num-prompts", "1000", "--concurrency", "1000", "--seed", "102")
        result["http_128x128"] = s["runs"][0]
        result["http_128x128_out_tok_s"] = s["runs"][0]["throughput"]["output_tokens_per_s"]
        print("http_128x128", json.dumps(s["runs"][0]["throughput"]), flush=True)
    finally:
        stop(proc)
    out_file.write_text(json.dumps(result, indent=2))


def latency_sweep(args: argparse.Namespace, result: dict, out_file: Path) -> None:
    """TTFT/TPOT at concurrency 1, 16, 64, 256 for 1024 in / 128 out, on the same body with
    the demo vocabulary, so that every id decodes to text."""
    path = demo_vocab_model_dir(args.config)
    result["latency_model"] = f"{args.config.stem} body, demo tokenizer's 934-id vocabulary"
    proc, url, _ = start_server(path, args.out / "server_latency.log", args.max_num_seqs)
    try:
        bench(url, path, WORK / "warmup2", "--input-len", "1024", "--output-len", "8",
              "--num-prompts", "64", "--concurrency", "64", "--seed", "103")
        for c in (1, 16, 64, 256):
            n = max(16, 2 * c)
            s = bench(url, path, WORK / f"c{c}_1024x128", "--input-len", "1024",
                      "--output-len", "128", "--num-prompts", str(n), "--concurrency", str(c),
                      "--seed", str(200 + c))
            run = s["runs"][0]
            result[f"http_1024x128_c{c}"] = run
            out_file.write_text(json.dumps(result, indent=2))
            lat = run["latency_ms"]
            print(f"c={c}", json.dumps({k: lat.get(k) for k in ("ttft", "tpot")}), flush=True)
    finally:
        stop(proc)


if __name__ == "__main__":
    sys.exit(main())
