"""Shared pieces of the KV warehouse tests: a small layout, real block hashes, real Redis."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

from soberana.engine.block_hash import chain_hashes
from soberana.kv.layout import KVLayout

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MODEL = "tiny-test-model"


def small_layout(model: str = MODEL, **overrides) -> KVLayout:
    """A 1 KiB block: 2 layers x K/V x 4 slots x 2 heads x 8 dims x float32."""
    fields = dict(
        model_fingerprint=model, dtype="float32", block_size=4, num_layers=2, num_kv_heads=2,
        head_dim=8,
    )  # fmt: skip
    fields.update(overrides)
    return KVLayout(**fields)


def big_layout() -> KVLayout:
    """A 1 MiB block (float16), so that a write takes long enough to be interrupted."""
    return small_layout(dtype="float16", block_size=16, num_layers=32, num_kv_heads=8, head_dim=64)


def make_hashes(
    layout: KVLayout, num_blocks: int, salt: str | None = None, seed: int = 0
) -> list[bytes]:
    """The engine's hash chain over random token ids: what the warehouse is keyed by."""
    rng = random.Random(seed)
    tokens = [rng.randrange(32000) for _ in range(num_blocks * layout.block_size)]
    return chain_hashes(layout.fingerprint, tokens, layout.block_size, salt)


def make_cache(layout: KVLayout, num_blocks: int, seed: int = 0):
    """An engine-shaped KV cache `[layers, 2, blocks, block_size, heads, dim]` of noise."""
    import torch  # not at the top: the crash-test writer must start fast, without torch

    g = torch.Generator().manual_seed(seed)
    shape = (layout.num_layers, 2, num_blocks, layout.block_size, layout.num_kv_heads,
             layout.head_dim)  # fmt: skip
    return torch.randn(shape, generator=g).to(layout.torch_dtype)


def block_bytes(cache, block_id: int) -> bytes:
    """One block's payload as the warehouse stores it."""
    return cache[:, :, block_id].contiguous().numpy().tobytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throwaway `redis-server` on a free loopback port, no persistence."""

    def __init__(self, workdir: Path, *extra_args: str, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian package redis-server)")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        args = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(workdir), "--logfile", str(workdir / "redis.log"),
            *extra_args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                return
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    log = (workdir / "redis.log").read_text(errors="replace")
                    raise RuntimeError(f"redis-server did not start:\n{log}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def child_env() -> dict[str, str]:
    """Environment for helper scripts: the repository importable, as under pytest."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }


def spawn_child(script: str, *args: str) -> subprocess.Popen:
    """Start a helper script with its stdout readable line by line."""
    return subprocess.Popen(
        [sys.executable, str(HERE / script), *args],
        cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def expect_line(proc: subprocess.Popen, expected: str) -> None:
    """Wait for the child to print `expected` (the test's timeout bounds the wait)."""
    line = proc.stdout.readline().strip()
    if line != expected:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"child printed {line!r}, not {expected!r}; stderr:\n{err}")


def kill_child(proc: subprocess.Popen) -> None:
    """SIGKILL (no cleanup runs in the child) and reap."""
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=10)


def run_child(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run one of this folder's helper scripts in a fresh interpreter; fail on its error."""
    proc = subprocess.run(
        [sys.executable, str(HERE / script), *args],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, f"{script} {args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def ask_in_rounds(llm, users: list[list[int]], params, rounds: int, seed: int) -> list[list[int]]:
    """Each user asks again every round, in a shuffled order (one at a time, as agents do):
    some come back soon after their last turn, some long after. Returns every answer's ids."""
    import random

    rng = random.Random(seed)
    tokens = []
    for _ in range(rounds):
        order = list(range(len(users)))
        rng.shuffle(order)
        for user in order:
            tokens.append(llm.generate([users[user]], params)[0].outputs[0].token_ids)
    return tokens
