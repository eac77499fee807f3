"""KV warehouse transfer rates on one GPU, Llama-3.1-8B block layout (2 MB blocks, bf16).

The engine's cache is `[32, 2, num_blocks, 16, 8, 128]`: one block is 64 strided pieces of
32 KB. With a pinned host tier, this measures for one returning user's prefix (`--blocks`,
default 232: 3,712 tokens), each the median of `--reps`:

- the ceiling: one pinned host-to-device and device-to-host copy of the same bytes;
- loads from the host tier into scattered cache blocks: the loader (batched staging, one
  scatter per batch) and the per-block copy it replaced (`kv_cache[:, :, b].copy_`);
- stores of scattered cache blocks into the host tier: `put_blocks_async` (what the engine's
  evictions use) and per-block `put_async`; the engine thread's time and the time until
  stored;
- the same loads while another thread runs Python (the engine loop holding the GIL), with
  the default 5 ms GIL switch interval and with 0.5 ms.

Every loaded block is checked byte for byte. Writes one JSON file.

    python benchmarks/gpu/kv_transfer.py --output $OUT/kv_transfer_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from soberana.kv.host_tier import HostTier  # noqa: E402
from soberana.kv.layout import KVLayout  # noqa: E402
from soberana.kv.warehouse import KVWarehouse  # noqa: E402


def timed(fn: Callable[[], object], reps: int) -> dict:
    """Median and best wall time of `fn` (which must synchronise what it measures), in ms."""
    fn()  # warm-up: streams, staging buffers, allocator
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return {"median_ms": statistics.median(times), "best_ms": min(times)}


def with_rate(result: dict, nbytes: int) -> dict:
    return result | {"GB_per_s": nbytes / result["median_ms"] / 1e6}


class PythonLoad:
    """Another thread running pure Python, as the engine thread does between kernels."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)

    def _spin(self) -> None:
        n = 0
        while not self._stop.is_set():
            for _ in range(1000):
                n += 1

    def __enter__(self) -> PythonLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def cpu_model() -> str:
    """The CPU's model name, from lscpu."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines()
                 if ln.startswith("Model name")), "unknown")  # fmt: skip


def ceilings(nbytes: int, device: torch.device, reps: int) -> tuple[dict, dict]:
    """One contiguous pinned copy of `nbytes` each way: what the bus allows."""
    gpu = device.type == "cuda"
    host_buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=gpu)
    dev_buf = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def copy(dst: torch.Tensor, src: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            dst.copy_(src, non_blocking=True)
            if gpu:
                torch.cuda.synchronize()

        return run

    h2d = with_rate(timed(copy(dev_buf, host_buf), reps), nbytes)
    return h2d, with_rate(timed(copy(host_buf, dev_buf), reps), nbytes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=232, help="blocks per load or store")
    ap.add_argument("--pool-blocks", type=int, default=2048, help="the GPU cache's blocks")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script")
    ap.add_argument("--output", type=Path, default=Path("kv_transfer.json"))
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    n, reps = args.blocks, args.reps
    cache = torch.randn(32, 2, args.pool_blocks, 16, 8, 128, device=device, dtype=torch.bfloat16)
    layout = KVLayout.from_kv_cache(cache, "llama-3.1-8b-shape")
    nbytes = n * layout.block_nbytes
    rng = random.Random(0)
    half = args.pool_blocks // 2
    src_ids = rng.sample(range(half), n)  # evicted blocks: anywhere in the pool
    dst_ids = rng.sample(range(half, args.pool_blocks), n)  # a load's fresh blocks
    result: dict = {
        "benchmark": "kv_transfer",
        "commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),  # fmt: skip
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "block_shape": list(layout.block_shape),
        "block_bytes": layout.block_nbytes,
        "blocks": n,
        "bytes": nbytes,
    }

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize()

    result["ceiling_h2d"], result["ceiling_d2h"] = ceilings(nbytes, device, reps)

    # Room for three loads' worth: older stores are evicted (dropped), the last one stays.
    host = HostTier(layout, 3 * nbytes, pin_memory=gpu)
    warehouse = KVWarehouse(layout, host=host, write_buffer_bytes=nbytes, pin_memory=gpu)
    try:
        result["calibrated_host_load_tokens_per_s"] = warehouse.calibrate(
            1.0, device).load_tokens_per_s["host"]  # fmt: skip
        engine_ms: list[float] = []

        def store(batched: bool) -> Callable[[], None]:
            def run() -> None:
                hashes = [os.urandom(32) for _ in range(n)]  # new names: nothing is skipped
                start = time.perf_counter()
                if batched:
                    assert warehouse.put_blocks_async(hashes, cache, src_ids) == 0
                else:
                    for h, b in zip(hashes, src_ids, strict=True):
                        assert warehouse.put_async(h, cache[:, :, b])
                engine_ms.append(1000 * (time.perf_counter() - start))
                assert warehouse.flush(timeout=60)

            return run

        for name, batched in (("store_batched", True), ("store_per_block", False)):
            engine_ms.clear()
            result[name] = with_rate(timed(store(batched), reps), nbytes)
            result[name]["engine_thread_median_ms"] = statistics.median(engine_ms[1:])

        hashes = [os.urandom(32) for _ in range(n)]
        assert warehouse.put_blocks_async(hashes, cache, src_ids) == 0
        assert warehouse.flush(timeout=60)
        expected = cache[:, :, src_ids].clone()

        def load_batched() -> None:  # all in host RAM: issued inline by the calling thread
            assert warehouse.load_async(hashes, cache, dst_ids).wait(timeout=60) == n

        def load_threaded() -> None:  # the loader thread's path (blocks below host RAM)
            assert warehouse._loader.submit(hashes, cache, dst_ids).wait(timeout=60) == n

        stream = torch.cuda.Stream() if gpu else None

        def load_per_block() -> None:  # the loader before batching, step for step
            held = [host.acquire(h) for h in hashes]
            with torch.cuda.stream(stream):
                for (_, payload), b in zip(held, dst_ids, strict=True):
                    view = payload.view(torch.bfloat16).view(layout.block_shape)
                    cache[:, :, b].copy_(view, non_blocking=True)
                sync()
            for slot, _ in held:
                host.release(slot)

        # "beside a Python thread" stands for the engine's thread running Python while the
        # load is served: inline loads are issued by that thread itself, so for them the
        # number that applies in the engine is the one without it.
        for name, fn in (("load_batched", load_batched), ("load_threaded", load_threaded),
                         ("load_per_block", load_per_block)):  # fmt: skip
            cache[:, :, dst_ids] = 0
            result[name] = with_rate(timed(fn, reps), nbytes)
            sync()
            result[name]["blocks_identical"] = bool(torch.equal(cache[:, :, dst_ids], expected))
            with PythonLoad():
                result[name + "_beside_python_thread"] = with_rate(timed(fn, reps), nbytes)
            interval = sys.getswitchinterval()
            sys.setswitchinterval(0.0005)  # what a 0.5 ms GIL switch interval would give
            try:
                with PythonLoad():
                    result[name + "_beside_python_thread_switch_0.5ms"] = with_rate(
                        timed(fn, reps), nbytes
                    )
            finally:
                sys.setswitchinterval(interval)
    finally:
        warehouse.close()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        if isinstance(value, dict):
            print(f"{key:36s} {value.get('median_ms', 0):8.2f} ms  "
                  f"{value.get('GB_per_s', 0):6.1f} GB/s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
