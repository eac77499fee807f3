"""How many streamed requests per second `soberana bench` drives from one client core.

Starts `python -m soberana.bench.fake_endpoint` (a fast local OpenAI endpoint, raw asyncio,
answers at once) pinned to one core, pins this process (the client) to another, and measures
in the same run:

  * `soberana bench` itself, the whole command (progress bar, /metrics scraping, summary,
    files): requests/s over its run and requests per client CPU-second (`client_cpu_s`), as
    summary.json reports them;
  * its hot path alone (client + load driver), in requests per client CPU-second (from
    process_time, so other load on a shared machine does not inflate it);
  * the peer: a bare aiohttp loop sending the same requests and reading the same streams
    without timing or parsing anything, i.e. the floor of the HTTP library underneath.

Each request streams `--output-len` tokens (one SSE chunk each, plus finish, usage and
[DONE]). Raw results go to benchmarks/results/bench_overhead.json.

    python benchmarks/bench_overhead.py [--client-cpu 0 --server-cpu 1] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from soberana.bench.client import StreamingClient  # noqa: E402
from soberana.bench.config import LengthRange, LoadPoint, Target, WorkloadConfig  # noqa: E402
from soberana.bench.load import DispatchBudget, LoadDriver  # noqa: E402
from soberana.bench.tokens import load_token_counter  # noqa: E402
from soberana.bench.workloads import build_source  # noqa: E402
from soberana.cli import main as soberana_main  # noqa: E402

TARGET_REQ_PER_S = 1000.0


def start_endpoint(cpu: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "soberana.bench.fake_endpoint", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
    )
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise RuntimeError(f"fake endpoint did not start: {line!r}")
    return proc, line.strip().removeprefix("listening on ")


def run_command(url: str, n: int, concurrency: int, input_len: int, output_len: int) -> dict:
    """The whole `soberana bench` command: requests/s and per client CPU-second (summary.json)."""
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        code = soberana_main(
            [
                "bench",
                "--base-url",
                url,
                "--model",
                "fake-model",
                "--num-prompts",
                str(n),
                "--concurrency",
                str(concurrency),
                "--input-len",
                str(input_len),
                "--output-len",
                str(output_len),
                "--warmup",
                "200",
                "--output-dir",
                out,
            ]
        )
        if code != 0:
            raise RuntimeError(f"soberana bench exited {code}")
        run = json.loads(Path(out, "summary.json").read_text())["runs"][0]
    if run["requests"]["failed"]:
        raise RuntimeError(f"requests failed: {run['requests']['errors']}")
    return {
        "req_per_s": run["throughput"]["requests_per_s"],
        "req_per_cpu_s": run["requests"]["completed"] / run["client_cpu_s"],
    }


async def hot_path(url: str, n: int, concurrency: int, input_len: int, output_len: int) -> dict:
    """The client and load driver alone: wall rate and requests per client CPU-second."""
    counter, _ = load_token_counter(None, None)
    workload = WorkloadConfig(
        input_len=LengthRange(input_len, input_len), output_len=LengthRange(output_len, output_len)
    )
    source = build_source(workload, counter, 0, n)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        client = StreamingClient(session, Target(url + "/v1", model="fake-model"))
        driver = LoadDriver(source, client.send, DispatchBudget(n, None), lambda r: None)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        results = await driver.run(LoadPoint(concurrency), random.Random(0))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    if not all(r.ok and r.output_tokens == output_len for r in results):
        raise RuntimeError("hot path: some requests failed")
    return {"req_per_s": n / wall, "req_per_cpu_s": n / cpu}


async def peer(url: str, n: int, concurrency: int, input_len: int, output_len: int) -> dict:
    """A bare aiohttp loop: same requests, streams read line by line, nothing timed or parsed."""
    body = json.dumps(
        {
            "model": "fake-model",
            "prompt": " word" * input_len,
            "max_tokens": output_len,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    headers = {"Content-Type": "application/json"}
    todo = iter(range(n))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def user() -> None:
            for _ in todo:
                async with session.post(
                    url + "/v1/completions", data=body, headers=headers
                ) as resp:
                    async for _line in resp.content:
                        pass

        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {"req_per_s": n / wall, "req_per_cpu_s": n / cpu}


def sources_digest() -> str:
    """sha256 over soberana/bench/*.py: identifies the measured code even when uncommitted."""
    h = hashlib.sha256()
    for path in sorted((REPO / "soberana" / "bench").glob("*.py")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def main() -> int:
    """Measure and write the raw results; exit 1 if the command misses the target."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--client-cpu", type=int, default=0)
    parser.add_argument("--server-cpu", type=int, default=1)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", default="16,64")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out", default=str(REPO / "benchmarks" / "results" / "bench_overhead.json")
    )
    args = parser.parse_args()

    load_before = os.getloadavg()
    proc, url = start_endpoint(args.server_cpu)
    os.sched_setaffinity(0, {args.client_cpu})
    rows = []
    try:
        for c in (int(x) for x in args.concurrency.split(",")):
            shape = (url, args.requests, c, args.input_len, args.output_len)
            row = {"concurrency": c, "command": [], "hot_path": [], "peer_bare_aiohttp": []}
            for _ in range(args.repeats):  # interleaved, so drifting background load hits all three
                row["command"].append(run_command(*shape))
                row["hot_path"].append(asyncio.run(hot_path(*shape)))
                row["peer_bare_aiohttp"].append(asyncio.run(peer(*shape)))
            row["median"] = {
                "command_req_per_s": statistics.median(r["req_per_s"] for r in row["command"]),
                "command_req_per_cpu_s": statistics.median(
                    r["req_per_cpu_s"] for r in row["command"]
                ),
                "hot_path_req_per_s": statistics.median(r["req_per_s"] for r in row["hot_path"]),
                "hot_path_req_per_cpu_s": statistics.median(
                    r["req_per_cpu_s"] for r in row["hot_path"]
                ),
                "peer_req_per_s": statistics.median(
                    r["req_per_s"] for r in row["peer_bare_aiohttp"]
                ),
                "peer_req_per_cpu_s": statistics.median(
                    r["req_per_cpu_s"] for r in row["peer_bare_aiohttp"]
                ),
            }
            rows.append(row)
            m = row["median"]
            print(
                f"concurrency {c}: command {m['command_req_per_s']:.0f} req/s, "
                f"{m['command_req_per_cpu_s']:.0f} req/CPU-s; "
                f"hot path {m['hot_path_req_per_s']:.0f} req/s, "
                f"{m['hot_path_req_per_cpu_s']:.0f} req/CPU-s; "
                f"bare aiohttp {m['peer_req_per_s']:.0f} req/s, "
                f"{m['peer_req_per_cpu_s']:.0f} req/CPU-s"
            )
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "soberana/bench"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "none (no commit yet)", ""
    # Per client CPU-second: what one core does when it is the client's alone. On a shared
    # machine the wall-clock rate also counts other processes' time on that core.
    passed = all(r["median"]["command_req_per_cpu_s"] >= TARGET_REQ_PER_S for r in rows)
    result = {
        "benchmark": "bench_overhead",
        "what": "streamed requests/s that soberana bench drives from one pinned client core "
        "against a fast local endpoint on another core",
        "commit": commit,
        "bench_sources_uncommitted": bool(dirty.strip()),
        "bench_sources_sha256": sources_digest(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "hardware": {
            "lscpu": subprocess.run(["lscpu"], capture_output=True, text=True).stdout,
            "client_cpu": args.client_cpu,
            "server_cpu": args.server_cpu,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "software": {
            "python": platform.python_version(),
            "aiohttp": aiohttp.__version__,
            "platform": platform.platform(),
        },
        "config": {
            "requests_per_run": args.requests,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "repeats": args.repeats,
            "sse_events_per_request": args.output_len + 3,
        },
        "peer": "bare aiohttp streaming loop (no timing, no parsing), same endpoint, same run",
        "target_req_per_s": TARGET_REQ_PER_S,
        "passed_means": "median command requests per client CPU-second >= target, "
        "at every concurrency",
        "passed": passed,
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'PASS' if passed else 'FAIL'}: target {TARGET_REQ_PER_S:.0f} req/s; wrote {args.out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
