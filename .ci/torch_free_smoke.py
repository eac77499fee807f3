"""A gateway and bench host without torch (issue 18): the load generator drives the gateway,
which routes to an OpenAI-compatible endpoint, and none of them needs torch, transformers,
matplotlib or redis.

Run by .ci/torch_free_smoke.sh in a fresh venv holding only `soberana[gateway,bench]`, and by
tests/test_architecture.py in the dev environment with those packages blocked from import.
Exits non-zero with the reason on the first failure.
"""

from __future__ import annotations

import hashlib
import json
import select
import subprocess
import sys
import tempfile
from pathlib import Path

ABSENT = ("torch", "transformers", "matplotlib", "redis")
KEY = "sk-torch-free-smoke"


def main() -> int:
    for name in ABSENT:
        try:
            __import__(name)
        except ModuleNotFoundError:
            continue
        return _fail(f"{name} is importable: this check needs a host without it")
    cli = [sys.executable, "-m", "soberana.cli"]
    for command in ("gateway", "bench"):
        run = subprocess.run([*cli, command, "--help"], capture_output=True, text=True, timeout=60)
        if run.returncode != 0:
            return _fail(f"soberana {command} --help exited {run.returncode}: {run.stderr}")
    serve = subprocess.run([*cli, "serve", "--help"], capture_output=True, text=True, timeout=60)
    if serve.returncode == 0 or "pip install 'soberana[serve]'" not in serve.stderr:
        return _fail(f"soberana serve without torch should name its extra: {serve.stderr}")
    with tempfile.TemporaryDirectory() as tmp:
        return _bench_through_gateway(cli, Path(tmp))


def _bench_through_gateway(cli: list[str], tmp: Path) -> int:
    procs: list[subprocess.Popen] = []
    try:
        endpoint = _start(procs, [sys.executable, "-m", "soberana.bench.fake_endpoint", "--port",
                                  "0", "--model", "fake-model"])  # fmt: skip
        config = {
            "models": {"fake-model": {"backends": [{
                "name": "local", "endpoint": endpoint, "kind": "vllm", "model": "fake-model",
                "privacy": "onprem",
                "capabilities": ["chat", "completions"]}]}},
            "tenants": [{"name": "smoke", "key_sha256": [hashlib.sha256(KEY.encode()).hexdigest()]}],
        }  # fmt: skip
        (tmp / "gateway.yaml").write_text(json.dumps(config))  # JSON is YAML
        gateway = _start(procs, [*cli, "gateway", "--config", str(tmp / "gateway.yaml"),
                                 "--host", "127.0.0.1", "--port", "0"])  # fmt: skip
        out = tmp / "out"
        bench = subprocess.run(
            [*cli, "bench", "--base-url", gateway + "/v1", "--model", "fake-model",
             "--api-key", KEY, "--num-prompts", "8", "--concurrency", "2", "--input-len", "16", "--output-len", "8",
             "--no-progress", "--output-dir", str(out)],
            capture_output=True, text=True, timeout=120)  # fmt: skip
        if bench.returncode != 0:
            return _fail(f"soberana bench exited {bench.returncode}: {bench.stderr}")
        summary = json.loads((out / "summary.json").read_text())
        completed = summary["runs"][0]["requests"]["completed"]
        if completed != 8:
            return _fail(f"8 requests through the gateway, {completed} completed: {bench.stdout}")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
    print("torch-free smoke: gateway and bench ran without torch, transformers, matplotlib, "
          "redis (8/8 requests through the gateway)")
    return 0


def _start(procs: list[subprocess.Popen], cmd: list[str]) -> str:
    """Start a server that prints `listening on URL`; its URL."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(proc)
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline() if ready else ""
    if "listening on" not in line:
        proc.terminate()
        raise SystemExit(f"FAILED: {cmd[2:4]} did not start: {line!r} {proc.stderr.read()}")
    return line.split()[-1].rstrip("/")


def _fail(reason: str) -> int:
    print(f"FAILED: {reason}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
