"""Throughput of 64 concurrent json_schema requests against the same 64 requests unconstrained,
on a real `soberana serve` of the demo model (CPU), in one run.

Both kinds generate exactly --max-tokens tokens each (unconstrained: ignore_eos; constrained:
a schema whose one string must be longer than that), so the difference is what the grammar
costs per token: the mask (computed in the engine loop on a CPU), its application in the
sampler, the token fed back to the grammar, and the synchronous step a constrained batch needs.

Noise (a shared 2-core host): rounds are interleaved pairs whose order alternates (ABBA), so
a drifting load hits both kinds alike; each round gives one ratio, and the result is the
median ratio with its spread, plus the server's CPU seconds (API and engine-core processes,
from /proc) per run, which a preempted but otherwise idle server does not inflate. Run it
under the exclusive benchmark lock: `flock -x /tmp/bench.lock python benchmarks/...`.

    python benchmarks/structured_throughput.py [--rounds 8] [--max-tokens 64] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.structured_compile import cpu_flags, cpu_model, pct  # noqa: E402

LONG_STRING = {"type": "object", "properties": {"text": {"type": "string", "minLength": 2000}},
               "required": ["text"], "additionalProperties": False}


def start_server(log: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "soberana.cli", "serve", "demo", "--port", "0", "--max-num-seqs", "64",
         "--max-model-len", "256", "--kv-cache-gb", "0.2", "--disable-uvicorn-access-log"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return _wait_ready(proc, log)
    except BaseException:
        proc.kill()
        raise


def _wait_ready(proc: subprocess.Popen, log: Path) -> tuple[subprocess.Popen, str]:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        m = re.search(r"listening on (http://[0-9.]+:[0-9]+)", log.read_text(errors="replace"))
        if m:
            url = m.group(1)
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        return proc, url
                except httpx.HTTPError:
                    pass
                time.sleep(1)
        time.sleep(1)
    raise RuntimeError("server did not start")


def server_cpu_s(proc: subprocess.Popen) -> float:
    """CPU seconds (user + system) of the server's API process and its children so far."""
    root = psutil.Process(proc.pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


async def one_round(url: str, n: int, max_tokens: int, constrained: bool) -> dict:
    body: dict = {"model": "soberana-demo", "messages": [{"role": "user", "content": "Write"}],
                  "max_tokens": max_tokens, "temperature": 1.0}
    if constrained:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "long", "schema": LONG_STRING}}
    else:
        body["ignore_eos"] = True
    async with httpx.AsyncClient(timeout=900) as client:
        t0 = time.perf_counter()
        answers = await asyncio.gather(*[
            client.post(f"{url}/v1/chat/completions", json={**body, "seed": i}) for i in range(n)])
        wall = time.perf_counter() - t0
    tokens = 0
    for a in answers:
        a.raise_for_status()
        tokens += a.json()["usage"]["completion_tokens"]
    return {"constrained": constrained, "wall_s": wall, "completion_tokens": tokens,
            "tokens_per_s": tokens / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/structured_throughput_cpu_demo.json")
    args = ap.parse_args()
    log = Path("/tmp/structured_throughput_server.log")
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    proc, url = start_server(log)  # kills its server if it does not come up
    rounds = []
    try:
        asyncio.run(one_round(url, 8, 8, True))  # warm-up: tokenizer for grammars, first steps
        asyncio.run(one_round(url, 8, 8, False))
        for i in range(args.rounds):
            pair = {}
            for constrained in ((False, True) if i % 2 == 0 else (True, False)):  # ABBA
                cpu = server_cpu_s(proc)
                run = asyncio.run(one_round(url, args.concurrency, args.max_tokens, constrained))
                run["server_cpu_s"] = server_cpu_s(proc) - cpu
                run["loadavg"] = Path("/proc/loadavg").read_text().split()[0]
                pair["json_schema" if constrained else "unconstrained"] = run
            free, json_ = pair["unconstrained"], pair["json_schema"]
            pair["slowdown_pct"] = 100 * (free["tokens_per_s"] / json_["tokens_per_s"] - 1)
            pair["server_cpu_increase_pct"] = 100 * (json_["server_cpu_s"] / free["server_cpu_s"]
                                                     - 1)
            print(json.dumps(pair))
            rounds.append(pair)
    finally:
        proc.terminate()
        proc.wait(60)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    slow = [r["slowdown_pct"] for r in rounds]
    cpu = [r["server_cpu_increase_pct"] for r in rounds]
    result = {
        "cpu": cpu_model(), "cpu_flags": cpu_flags(), "commit": commit,
        "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "loadavg_start": load_start, "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
        "rounds": rounds,
        # slowdown: how much longer the json_schema run took for its tokens (wall time)
        "slowdown_pct": {"median": pct(slow, 0.5), "p25": pct(slow, 0.25), "p75": pct(slow, 0.75),
                         "min": min(slow), "max": max(slow)},
        "server_cpu_increase_pct": {"median": pct(cpu, 0.5), "p25": pct(cpu, 0.25),
                                    "p75": pct(cpu, 0.75), "min": min(cpu), "max": max(cpu)},
        # the fastest run of each kind, the one least held up by other load on a shared host
        "best_slowdown_pct": 100 * (min(r["json_schema"]["wall_s"] for r in rounds)
                                    / min(r["unconstrained"]["wall_s"] for r in rounds) - 1),
        "pooled_slowdown_pct": 100 * (
            sum(r["unconstrained"]["completion_tokens"] for r in rounds)
            / sum(r["unconstrained"]["wall_s"] for r in rounds)
            / (sum(r["json_schema"]["completion_tokens"] for r in rounds)
               / sum(r["json_schema"]["wall_s"] for r in rounds)) - 1),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
