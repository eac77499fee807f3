"""Multi-round QA with the KV warehouse on vs off, same run (issue: KV warehouse).

Users x rounds, a shared system prompt, a long per-user history and short answers, with a
live working set several times the GPU/CPU KV pool. Two `soberana serve` processes are run
one after the other on the same model and workload — warehouse off (the peer) and on — and
driven by `soberana bench --workload multiturn`. Reported: TTFT p50/p99 of returning users
(turn >= 1, 0-based), throughput, prefix-cache and warehouse hit rates by tier (from /metrics).
Then two replicas sharing a Redis tier: replica B's first request for a conversation that
replica A served is answered from the warehouse.

    python benchmarks/kv_warehouse_multiturn.py --model ~/.cache/soberana/random-llama-125m
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `soberana serve` subprocess on a free loopback port."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "soberana.cli", "serve", *args, "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        raise RuntimeError("server did not become ready")

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, keyed by name plus labels."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                try:
                    out[key] = float(value)
                except ValueError:
                    pass
        return out

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def run_bench(server: Server, out_dir: Path, workload: list[str]) -> dict:
    """One `soberana bench` run; the server's counters are reported as this run's deltas."""
    before = server.metrics()
    cmd = [sys.executable, "-m", "soberana.cli", "bench", "--base-url", server.url + "/v1",
           "--workload", "multiturn", "--ignore-eos", "--no-progress",
           "--output-dir", str(out_dir), *workload]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    after = server.metrics()
    summary = json.loads((out_dir / "summary.json").read_text())
    ttft_returning = []
    ttft_first = []
    with open(out_dir / "requests.csv") as f:
        rows = [r for r in csv.DictReader(f) if not r["error_type"] and r["ttft_ms"]]
    for row in rows:
        ms = float(row["ttft_ms"])
        (ttft_returning if int(row["turn"]) >= 1 else ttft_first).append(ms)
    counters = ("_total", "_sum", "_count")
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()
             if k.startswith(("soberana:kv_", "vllm:prefix_cache", *SERVER_TIMES.values()))
             and k.split("{")[0].endswith(counters)}
    prefix = returning_prefix(rows)
    saved = metric(delta, "soberana:kv_prefill_tokens_saved_total")
    known = prefix["known_prefix_tokens"]
    prefix["from_warehouse_tokens"] = saved
    prefix["from_warehouse_frac"] = saved / known if known else None
    loads = metric(delta, "soberana:kv_load_latency_seconds_count")
    run = summary["runs"][0]
    return {"load": run["load"], "duration_s": run["duration_s"],
            "throughput": run["throughput"], "tokens": run["tokens"],
            "ttft_returning_ms": pct(ttft_returning), "ttft_first_turn_ms": pct(ttft_first),
            "returning_prefix": prefix,
            "mean_load_ms": 1000 * metric(delta, "soberana:kv_load_latency_seconds_sum") / loads
            if loads else None,
            "server_mean_ms": server_means(delta),
            "server_metrics_delta": {k: v for k, v in delta.items() if v}}


# The server's own clocks, all requests of a run (first turns included): TTFT from the
# engine's arrival stamp, the wait until first scheduled (a warehouse load included), and
# scheduled to first token. Against the client's TTFT they show where the time goes.
SERVER_TIMES = {"ttft": "vllm:time_to_first_token_seconds",
                "queue": "vllm:request_queue_time_seconds",
                "prefill": "vllm:request_prefill_time_seconds"}


def server_means(delta: dict[str, float]) -> dict[str, float | None]:
    """Mean of each server histogram over the run, in ms (None when it saw no request)."""
    out = {}
    for name, hist in SERVER_TIMES.items():
        count = metric(delta, hist + "_count")
        out[name] = 1000 * metric(delta, hist + "_sum") / count if count else None
    return out


def metric(metrics: dict[str, float], name: str) -> float:
    """The sum of a metric's samples over its labels."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


def returning_prefix(rows: list[dict], block_size: int = 16) -> dict:
    """How much of a returning user's known prefix was served from cache instead of prefill.

    Known prefix of turn t: the full blocks of turn t-1's prompt, which the system computed
    before. Cached tokens above it (e.g. the previous answer's blocks) are not counted.
    """
    prompt = {(r["user"], int(r["turn"])): int(r["prompt_tokens"]) for r in rows}
    known = served = 0
    for r in rows:
        turn = int(r["turn"])
        prev = prompt.get((r["user"], turn - 1))
        if turn < 1 or prev is None or not r["cached_tokens"]:
            continue
        k = prev // block_size * block_size
        known += k
        served += min(int(r["cached_tokens"]), k)
    return {"known_prefix_tokens": known, "served_from_cache_tokens": served,
            "served_frac": served / known if known else None}


def pct(values: list[float]) -> dict:
    if not values:
        return {}
    v = sorted(values)

    def q(p: float) -> float:
        k = (len(v) - 1) * p
        lo = int(k)
        hi = min(lo + 1, len(v) - 1)
        return v[lo] + (v[hi] - v[lo]) * (k - lo)

    return {"n": len(v), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "mean": sum(v) / len(v)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: the demo model)")
    ap.add_argument("--load-format", default=None)
    ap.add_argument("--kv-cache-gb", type=float, default=0.25, help="the engine's own KV pool")
    ap.add_argument("--kv-offload-gb", type=float, default=2.0)
    ap.add_argument("--kv-disk", action=argparse.BooleanOptionalAction, default=True,
                    help="add a local disk tier below host RAM (warehouse on)")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--system-prompt-len", type=int, default=256)
    ap.add_argument("--history-len", type=int, default=1024)
    ap.add_argument("--question-len", type=int, default=32)
    ap.add_argument("--answer-len", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--request-rates", default="",
                    help="after the closed loop, open-loop runs at these request rates (req/s, "
                    "comma-separated), each on fresh conversations, on the same servers")
    ap.add_argument("--open-loop-users", type=int, default=None,
                    help="users of each open-loop run (default: --users); rounds as --rounds")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--extra-serve-args", default="")
    ap.add_argument("--skip-replicas", action="store_true", help="skip the two-replica run")
    ap.add_argument("--output", type=Path,
                    default=Path("benchmarks/results/kv_warehouse_multiturn_cpu.json"))
    args = ap.parse_args()
    rates = [float(r) for r in args.request_rates.split(",") if r]

    work = Path(tempfile.mkdtemp(prefix="kvbench-"))
    serve = ([args.model] if args.model else []) + [
        "--max-model-len", str(args.max_model_len), "--kv-cache-gb", str(args.kv_cache_gb),
        *(["--load-format", args.load_format] if args.load_format else []),
        *args.extra_serve_args.split()]
    shape = ["--num-rounds", str(args.rounds),
             "--system-prompt-len", str(args.system_prompt_len),
             "--history-len", str(args.history_len), "--input-len", str(args.question_len),
             "--output-len", str(args.answer_len)]
    if args.model:
        shape += ["--tokenizer", args.model]

    def users(n: int) -> list[str]:
        return ["--num-users", str(n), "--num-prompts", str(n * args.rounds)]

    open_users = args.open_loop_users or args.users
    # Each run has its own seed, hence its own conversations: no run finds another's users in
    # the warehouse. The system prompt is the same text in every run.
    loads = [("closed", users(args.users) + ["--concurrency", str(args.concurrency),
                                             "--seed", "1"])]
    loads += [(f"rate_{r:g}", users(open_users) + ["--request-rate", str(r), "--seed", str(2 + i)])
              for i, r in enumerate(rates)]
    result = {
        "benchmark": "kv_warehouse_multiturn",
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                 text=True).stdout.strip(),
        "dirty": bool(subprocess.run(["git", "status", "--porcelain", "soberana", "benchmarks"],
                                     capture_output=True, text=True).stdout.strip()),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpu": cpu_model(),
                    "cores": os.cpu_count(), "gpu": gpu_name(),
                    "load_avg_at_start": os.getloadavg()},
        "settings": vars(args) | {"output": str(args.output)},
        "working_set_note": "users x (system + history + rounds x (question + answer)) tokens "
                            "against the engine's --kv-cache-gb pool",
        "returning_prefix_note": "known prefix of turn t = full blocks of turn t-1's prompt; "
                                 "served = cached tokens (GPU pool or warehouse) within it; "
                                 "from_warehouse = prefill tokens the warehouse loaded",
    }
    on_extra = ["--kv-offload-gb", str(args.kv_offload_gb)]
    if args.kv_disk:
        on_extra += ["--kv-disk-dir", str(work / "disk")]
    for name, extra in (("warehouse_off", []), ("warehouse_on", on_extra)):
        server = Server(serve + extra, work / f"{name}.log")
        try:
            runs = {}
            for load, flags in loads:
                runs[load] = run_bench(server, work / name / load, shape + flags)
                print(name, load, json.dumps(runs[load]["ttft_returning_ms"]),
                      json.dumps(runs[load]["returning_prefix"]), flush=True)
        finally:
            server.stop()
        # The closed loop stays at the top level, as in earlier results.
        result[name] = runs.pop("closed") | {"open_loop": runs}
        result[name]["engine_log_kv"] = [
            line.strip() for line in (work / f"{name}.log").read_text().splitlines()
            if "kv warehouse" in line or "KV cache:" in line][:20]
    result["ttft_returning_speedup"] = speedups(result)
    for load, ratio in result["ttft_returning_speedup"].items():
        print(f"returning-user TTFT {load}: p50 {ratio['p50']:.2f}x, p99 {ratio['p99']:.2f}x")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if not args.skip_replicas:
        try:
            result["two_replicas_redis"] = two_replicas(serve, work, args)
        except Exception as exc:  # keep the main results whatever happens here
            result["two_replicas_redis"] = {"error": f"{type(exc).__name__}: {exc}"}
        print("two_replicas_redis", json.dumps(result["two_replicas_redis"]), flush=True)
        args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def cpu_model() -> str:
    """The CPU's model name, from lscpu."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines()
                 if ln.startswith("Model name")), "unknown")


def gpu_name() -> str | None:
    """The first GPU's name, from nvidia-smi; None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def speedups(result: dict) -> dict:
    """Returning-user TTFT off / on for each load (closed loop and every request rate)."""
    off, on = result["warehouse_off"], result["warehouse_on"]
    pairs = {"closed": (off, on)} | {
        load: (off["open_loop"][load], on["open_loop"][load]) for load in off["open_loop"]}
    out = {}
    for load, (a, b) in pairs.items():
        ta, tb = a["ttft_returning_ms"], b["ttft_returning_ms"]
        if ta and tb:
            out[load] = {"p50": ta["p50"] / tb["p50"], "p99": ta["p99"] / tb["p99"],
                         "off_p50_ms": ta["p50"], "on_p50_ms": tb["p50"]}
    return out


def two_replicas(serve: list[str], work: Path, args) -> dict:
    """Replica A answers a conversation; replica B, sharing Redis, gets the same prompt."""
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        return {"skipped": "redis-server not installed"}
    port = free_port()
    redis = subprocess.Popen([redis_bin, "--port", str(port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        extra = ["--kv-redis-url", f"redis://127.0.0.1:{port}/0", "--kv-write-through",
                 "--kv-load-policy", "always",
                 # A loopback Redis only this benchmark reaches.
                 "--kv-shared-trusted"]
        a = Server(serve + extra, work / "replica_a.log")
        b = Server(serve + extra, work / "replica_b.log")
        # About a quarter of the context: "factN" is several tokens in small vocabularies.
        words = " ".join(f"fact{i}" for i in range(args.max_model_len // 16))
        body = {"model": None, "prompt": f"Conversation history: {words}. Question?",
                "max_tokens": 4, "temperature": 0}
        out = {}
        for name, server in (("replica_a", a), ("replica_b", b)):
            models = json.loads(urllib.request.urlopen(server.url + "/v1/models").read())
            body["model"] = models["data"][0]["id"]
            req = urllib.request.Request(server.url + "/v1/completions",
                                         data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            t0 = time.perf_counter()
            resp = json.loads(urllib.request.urlopen(req, timeout=300).read())
            usage = resp["usage"]
            out[name] = {"seconds": time.perf_counter() - t0,
                         "prompt_tokens": usage["prompt_tokens"],
                         "cached_tokens": (usage.get("prompt_tokens_details") or {}).get(
                             "cached_tokens"),
                         "text": resp["choices"][0]["text"]}
            time.sleep(1.0)  # let replica A's writer thread publish to Redis
        out["same_text"] = out["replica_a"]["text"] == out["replica_b"]["text"]
        a.stop()
        b.stop()
        return out
    finally:
        redis.terminate()
        redis.wait(10)


if __name__ == "__main__":
    sys.exit(main())
