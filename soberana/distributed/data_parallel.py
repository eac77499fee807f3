"""`soberana serve --data-parallel-size N`: N independent engine replicas on one host.

Each replica is a full `soberana serve` process (its own engine core, KV pool and port
--port + i) pinned to its own GPUs (tensor_parallel_size each); the gateway's prefix-affinity
routing spreads conversations over them. This process prints the gateway config, forwards
SIGTERM/SIGINT to the replicas and exits when they all have.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys


def replica_argv(argv: list[str], index: int, port: int) -> list[str]:
    """The `soberana serve` arguments of replica `index`: --port replaced, no data parallel."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--port", "--data-parallel-size"):
            skip = "=" not in arg
            continue
        out.append(arg)
    return [*out, "--port", str(port + index)]


def replica_devices(index: int, tensor_parallel_size: int) -> str:
    """CUDA_VISIBLE_DEVICES of replica `index`: its own consecutive GPUs."""
    first = index * tensor_parallel_size
    return ",".join(str(first + i) for i in range(tensor_parallel_size))


def gateway_config(model: str, host: str, port: int, replicas: int) -> str:
    """The `models` and `routing` sections of a gateway.yaml routing `model` over the
    replicas (docs/gateway.md); the operator adds `tenants` (their keys are secrets)."""
    lines = ["models:", f"  {model}:", "    backends:"]
    for i in range(replicas):
        lines += [f"      - endpoint: http://{host}:{port + i}/v1", "        kind: soberana",
                  f"        model: {model}", f"        name: replica-{i}",
                  # replicas this launcher starts on this host: prompts stay on site
                  "        privacy: onprem"]
    lines += ["routing:", "  prefix_affinity: true",
              "# tenants: add yours (key digests: soberana gateway --hash-key)"]
    return "\n".join(lines) + "\n"


def run_replicas(args: argparse.Namespace) -> int:
    n = args.data_parallel_size
    if n < 1:
        print(f"error: --data-parallel-size must be >= 1; got {n}", file=sys.stderr)
        return 2
    if args.port == 0:
        print("error: --data-parallel-size needs a fixed --port (replicas take --port + i)",
              file=sys.stderr)
        return 2
    argv = list(getattr(args, "_argv", sys.argv))[2:]  # after `soberana serve`
    name = (args.served_model_name[0] if args.served_model_name else args.model) or "demo"
    print(gateway_config(name, args.host if args.host != "0.0.0.0" else "127.0.0.1",
                         args.port, n), flush=True)
    procs = []
    gpus = args.device != "cpu"
    for i in range(n):
        env = dict(os.environ)
        if gpus and "CUDA_VISIBLE_DEVICES" not in os.environ:
            env["CUDA_VISIBLE_DEVICES"] = replica_devices(i, args.tensor_parallel_size)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "soberana.cli", "serve", *replica_argv(argv, i, args.port)],
            env=env))

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [p.wait() for p in procs]
    return max(codes, key=abs) if any(codes) else 0
