"""How much latency `soberana gateway` adds, and how many requests/s one core of it relays.

Starts, on this machine:
  * a fast local OpenAI-style upstream (raw asyncio, fixed chat-completion answer, keep-alive),
  * `soberana gateway` pinned to one core (`--gateway-cpu`) in front of it,
  * a keep-alive load generator (raw asyncio) on the other cores,
and measures, in the same run, the same requests sent directly to the upstream and through the
gateway: p50/p90/p99 at concurrency 1 and at a fixed open-loop rate below saturation, then the
gateway's saturated rate and its requests per CPU-second (from /proc, so other load on a shared
machine does not inflate it). Raw results go to benchmarks/results/gateway_overhead.json.

    python benchmarks/gateway_overhead.py [--gateway-cpu 0 --other-cpus 1] [--gateway-nice N] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import aiohttp
import uvloop
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
API_KEY = "bench-key"

_RESPONSE_BODY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": "bench-upstream",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "The quick brown fox jumps over the lazy dog.",
                },
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 42, "completion_tokens": 11, "total_tokens": 53},
    }
).encode()
_METRICS_BODY = b'vllm:num_requests_waiting{model_name="bench-upstream"} 0.0\nvllm:kv_cache_usage_perc{model_name="bench-upstream"} 0.1\n'
_REQUEST_BODY = json.dumps(
    {
        "model": "bench",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Summarise the plot of Hamlet in two sentences, please."},
        ],
        "max_tokens": 64,
    }
).encode()


# ---- the fast upstream (its own process) ------------------------------------------------------


class _UpstreamProtocol(asyncio.Protocol):
    """Minimal HTTP/1.1 keep-alive server: any POST gets the fixed completion, GETs health/metrics."""

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            method, path = head.split(" ", 2)[:2]
            if method == "POST":
                body, ctype = _RESPONSE_BODY, b"application/json"
            elif path == "/metrics":
                body, ctype = _METRICS_BODY, b"text/plain; version=0.0.4"
            else:
                body, ctype = b'{"status":"ok"}', b"application/json"
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: "
                + ctype
                + b"\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )


async def _serve_upstream() -> None:
    server = await asyncio.get_running_loop().create_server(_UpstreamProtocol, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


# ---- the load generator ---------------------------------------------------------------------


class _Connection:
    """One keep-alive connection sending requests one after another."""

    def __init__(self, host: str, port: int, path: str, headers: dict[str, str]) -> None:
        self.host, self.port = host, port
        lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append(f"Content-Length: {len(_REQUEST_BODY)}")
        self.request = ("\r\n".join(lines) + "\r\n\r\n").encode() + _REQUEST_BODY

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def send(self) -> float:
        """One request; returns its latency in seconds."""
        start = time.perf_counter()
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"unexpected response: {head[:200]!r}")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await self.reader.readexactly(length)
        return time.perf_counter() - start

    def close(self) -> None:
        self.writer.close()


async def _closed_loop(target: tuple[str, int, str, dict], concurrency: int, requests: int) -> dict:
    conns = [_Connection(*target) for _ in range(concurrency)]
    await asyncio.gather(*(c.open() for c in conns))
    latencies: list[float] = []
    remaining = requests

    async def worker(conn: _Connection) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            latencies.append(await conn.send())

    for c in conns:  # warm-up: connections and the gateway's upstream pool
        for _ in range(20):
            await c.send()
    start = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    elapsed = time.perf_counter() - start
    for c in conns:
        c.close()
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "seconds": elapsed,
        **_summary(latencies),
    }


async def _open_loop(target: tuple[str, int, str, dict], rate: float, seconds: float) -> dict:
    """Requests started at a fixed rate regardless of completions (a pool of connections)."""
    pool: asyncio.Queue[_Connection] = asyncio.Queue()
    for _ in range(64):
        c = _Connection(*target)
        await c.open()
        await c.send()
        pool.put_nowait(c)
    latencies: list[float] = []
    tasks = []

    async def one() -> None:
        conn = await pool.get()
        latencies.append(await conn.send())
        pool.put_nowait(conn)

    start = time.perf_counter()
    n = int(rate * seconds)
    for i in range(n):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    while not pool.empty():
        pool.get_nowait().close()
    return {"rate": rate, "requests": len(latencies), "seconds": elapsed, **_summary(latencies)}


def _summary(latencies: list[float]) -> dict:
    ordered = sorted(latencies)

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000

    return {
        "p50_ms": q(0.50),
        "p90_ms": q(0.90),
        "p99_ms": q(0.99),
        "mean_ms": statistics.fmean(ordered) * 1000,
    }


def _runqueue_wait_ms(pid: int) -> float:
    """Time the process has spent runnable but waiting for a CPU (other load on its core)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e6


async def _added_latency_histogram(port: int) -> dict[str, float]:
    """Cumulative bucket counts of the gateway's own added-latency histogram."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            text = await response.text()
    return {
        s.labels["le"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "soberana_gateway_added_latency_seconds_bucket"
    }


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


# ---- orchestration --------------------------------------------------------------------------


def _start(cmd: list[str], cpus: set[int], nice: int = 0) -> tuple[subprocess.Popen, str]:
    def pin() -> None:
        os.sched_setaffinity(0, cpus)
        if nice:
            os.nice(nice)

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO, preexec_fn=pin)
    line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        raise RuntimeError(f"{cmd} did not start")
    return proc, line


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _environment() -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except subprocess.CalledProcessError:
        commit = "none (no commit yet)"
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "soberana/gateway"],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return {
        "commit": commit,
        "gateway_sources_uncommitted": bool(dirty.strip()),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "uvloop": uvloop.__version__,
        "lscpu": lscpu,
        "loadavg_before": os.getloadavg(),
    }


async def _measure(
    args: argparse.Namespace, upstream_port: int, gateway_port: int, gateway_pid: int
) -> dict:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    direct = ("127.0.0.1", upstream_port, "/v1/chat/completions", {})
    through = ("127.0.0.1", gateway_port, "/v1/chat/completions", auth)
    results: dict = {"concurrency_1": {}, "open_loop": {}, "saturation": {}}
    for phase, run in (
        ("concurrency_1", lambda target: _closed_loop(target, 1, args.requests)),
        ("open_loop", lambda target: _open_loop(target, args.rate, args.seconds)),
    ):
        results[phase]["direct"] = await run(direct)
        waited = _runqueue_wait_ms(gateway_pid)
        cpu = _cpu_seconds(gateway_pid)
        histogram = await _added_latency_histogram(gateway_port)
        gateway = results[phase]["gateway"] = await run(through)
        # Tail latency on a shared machine is mostly this: the gateway waiting for its core.
        gateway["gateway_runqueue_wait_ms"] = _runqueue_wait_ms(gateway_pid) - waited
        gateway["gateway_cpu_ms_per_request"] = (
            (_cpu_seconds(gateway_pid) - cpu) * 1000 / gateway["requests"]
        )
        after = await _added_latency_histogram(gateway_port)
        # The gateway's own view (soberana_gateway_added_latency_seconds), warm-up included.
        gateway["gateway_reported_added_latency_buckets"] = {
            le: after[le] - histogram.get(le, 0) for le in after
        }
    cpu_before = _cpu_seconds(gateway_pid)
    sat = await _closed_loop(through, args.saturation_concurrency, int(args.saturation_requests))
    cpu = _cpu_seconds(gateway_pid) - cpu_before
    sat["gateway_cpu_seconds"] = cpu
    sat["requests_per_gateway_cpu_second"] = sat["requests"] / cpu if cpu else None
    sat["wall_requests_per_second"] = sat["requests"] / sat["seconds"]
    results["saturation"]["gateway"] = sat
    results["saturation"]["direct"] = await _closed_loop(
        direct, args.saturation_concurrency, int(args.saturation_requests)
    )
    for phase in ("concurrency_1", "open_loop"):
        d, g = results[phase]["direct"], results[phase]["gateway"]
        results[phase]["added_ms"] = {q: g[q] - d[q] for q in ("p50_ms", "p90_ms", "p99_ms")}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gateway-cpu", type=int, default=0)
    parser.add_argument(
        "--other-cpus", default="1", help="comma-separated CPUs for upstream and load"
    )
    parser.add_argument(
        "--gateway-nice",
        type=int,
        default=0,
        help="niceness of the gateway process; negative (root) approximates a dedicated core "
        "on a machine shared with other work",
    )
    parser.add_argument("--requests", type=int, default=5000, help="per concurrency-1 round")
    parser.add_argument(
        "--rate", type=float, default=300.0, help="open-loop requests/s (below saturation)"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="open-loop duration")
    parser.add_argument("--saturation-concurrency", type=int, default=32)
    parser.add_argument("--saturation-requests", type=int, default=20000)
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks/results/gateway_overhead.json"
    )
    parser.add_argument("--upstream", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream:
        uvloop.run(_serve_upstream())
        return 0
    other = {int(c) for c in args.other_cpus.split(",")}
    os.sched_setaffinity(0, other)
    env = _environment()
    upstream, port_line = _start([sys.executable, __file__, "--upstream"], other)
    upstream_port = int(port_line)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "gateway.yaml"
        config.write_text(
            textwrap.dedent(
                f"""
                models:
                  bench:
                    backends:
                      - name: fast-local
                        endpoint: http://127.0.0.1:{upstream_port}
                        kind: vllm
                        model: bench-upstream
                        privacy: onprem
                        max_concurrency: 1024
                        context_window: 32768
                tenants:
                  - name: bench
                    key_sha256: [{hashlib.sha256(API_KEY.encode()).hexdigest()}]
                    requests_per_minute: 100000000
                    tokens_per_minute: 100000000000
                """
            )
        )
        gateway, line = _start(
            [
                sys.executable,
                "-m",
                "soberana.cli",
                "gateway",
                "--config",
                str(config),
                "--port",
                "0",
            ],
            {args.gateway_cpu},
            args.gateway_nice,
        )
        try:
            gateway_port = int(line.rsplit(":", 1)[1])
            results = uvloop.run(_measure(args, upstream_port, gateway_port, gateway.pid))
        finally:
            _stop(gateway)
            _stop(upstream)
    env["loadavg_after"] = os.getloadavg()
    report = {
        "benchmark": "gateway_overhead",
        "setup": {
            "gateway_cpu": args.gateway_cpu,
            "gateway_nice": args.gateway_nice,
            "upstream_and_load_cpus": sorted(other),
            "request_bytes": len(_REQUEST_BODY),
            "response_bytes": len(_RESPONSE_BODY),
            "peer": "the same upstream measured directly (no gateway) in the same run",
            "targets": {
                "added_p50_ms": 1.0,
                "added_p99_ms": 5.0,
                "requests_per_second_per_core": 1000,
            },
        },
        "environment": env,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    c1, ol, sat = results["concurrency_1"], results["open_loop"], results["saturation"]["gateway"]
    for label, phase in (("concurrency 1", c1), (f"open loop {args.rate:.0f}/s", ol)):
        d, g = phase["direct"], phase["gateway"]
        print(
            f"{label}: direct p50 {d['p50_ms']:.3f} p99 {d['p99_ms']:.3f} ms | gateway p50 "
            f"{g['p50_ms']:.3f} p99 {g['p99_ms']:.3f} ms | added p50 {phase['added_ms']['p50_ms']:.3f} "
            f"p99 {phase['added_ms']['p99_ms']:.3f} ms | gateway CPU "
            f"{g['gateway_cpu_ms_per_request']:.3f} ms/request, waited "
            f"{g['gateway_runqueue_wait_ms']:.0f} ms for its core"
        )
    print(
        f"saturation (c={args.saturation_concurrency}): {sat['wall_requests_per_second']:.0f} req/s "
        f"wall, {sat['requests_per_gateway_cpu_second']:.0f} requests per gateway CPU-second"
    )
    print(f"raw results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
