"""Throughput of 64 concurrent json_schema requests against the same 64 requests unconstrained,
on a real `soberana serve` of the demo model (CPU), in one run.

Both kinds generate exactly --max-tokens tokens each (unconstrained: ignore_eos; constrained:
a schema whose one string must be longer than that), so the difference is what the grammar
costs per token: the mask computed on a host thread during the forward pass, its application
in the sampler, and the synchronous step a constrained batch needs. Rounds alternate.

    python benchmarks/structured_throughput.py [--rounds 3] [--max-tokens 64] [--out PATH]
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.structured_compile import cpu_model  # noqa: E402

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
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/structured_throughput_cpu_demo.json")
    args = ap.parse_args()
    log = Path("/tmp/structured_throughput_server.log")
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    proc, url = start_server(log)  # kills its server if it does not come up
    try:
        asyncio.run(one_round(url, 8, 8, True))  # warm-up: tokenizer for grammars, first steps
        asyncio.run(one_round(url, 8, 8, False))
        runs = []
        for _ in range(args.rounds):
            for constrained in (False, True):
                run = asyncio.run(one_round(url, args.concurrency, args.max_tokens, constrained))
                print(json.dumps(run))
                runs.append(run)
    finally:
        proc.terminate()
        proc.wait(60)
    free = [r["tokens_per_s"] for r in runs if not r["constrained"]]
    json_ = [r["tokens_per_s"] for r in runs if r["constrained"]]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result = {"cpu": cpu_model(), "commit": commit, "concurrency": args.concurrency,
              "max_tokens": args.max_tokens, "loadavg_start": load_start,
              "loadavg_end": Path("/proc/loadavg").read_text().split()[:3], "runs": runs,
              "unconstrained_best_tok_s": max(free), "json_schema_best_tok_s": max(json_),
              "slowdown_best_pct": 100 * (1 - max(json_) / max(free)),
              # Rounds alternate, so each pair ran at nearly the same host load.
              "slowdown_per_round_pct": [100 * (1 - j / f) for f, j in zip(free, json_)]}
    rounds = sorted(result["slowdown_per_round_pct"])
    result["slowdown_median_round_pct"] = rounds[len(rounds) // 2]
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
