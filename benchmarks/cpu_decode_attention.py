"""CPU decode attention inside a model step: the native kernel vs the PyTorch path, one process.

The same model and batch as `cpu_decode_step.py`; each repetition runs one step with the
native kernel (`soberana/ops/cpu/kernels.py`) and one with the PyTorch attention in its place
(the rest of the native backend unchanged), alternating, and times the whole step and the time
spent inside the attention. The second figure is what the kernel changes; GB/s is the KV cache it reads
per step (keys and values of every context token, all layers) over that time.

    python benchmarks/cpu_decode_attention.py
    python benchmarks/cpu_decode_attention.py --cases decode_bf16_64x192 --threads 2 --reps 21
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_decode_step import CASES, Impl, make_batch, random_state  # noqa: E402
from offline_throughput import SHAPES, commit, machine  # noqa: E402

from soberana.models import transformer  # noqa: E402
from soberana.models.config import ModelConfig  # noqa: E402
from soberana.ops import attention  # noqa: E402
from soberana.ops.backend import select_backend, with_kernels  # noqa: E402
from soberana.ops.cpu import kernels as cpu_kernels  # noqa: E402


def run_case(case, threads: list[int], reps: int) -> dict:
    cfg = ModelConfig.from_hf({**SHAPES[case.shape], "architectures": ["LlamaForCausalLM"],
                               "max_position_embeddings": 4096})  # fmt: skip
    dtype = getattr(torch, case.dtype)
    batch, kv_cache = make_batch(case, cfg, 16, torch.Generator().manual_seed(0))
    impl = Impl(attention, transformer, cfg, random_state(cfg, dtype), kv_cache, dtype)
    kv_bytes = (2 * sum(batch["meta"]["seq_lens_cpu"]) * cfg.num_layers * cfg.num_kv_heads
                * cfg.head_dim * kv_cache.element_size())  # fmt: skip
    spent = []

    def timed(fn):
        def attend(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            spent.append(time.perf_counter() - t0)
            return out

        return attend

    native = with_kernels(select_backend("native", torch.device("cpu"), dtype).kernels,
                          decoder_stack=None)  # the modules: attention is timed per layer
    paths = {"native": with_kernels(native, paged_attention=timed(native.paged_attention)),
             "torch": with_kernels(native, paged_attention=timed(attention.paged_attention))}
    result = {"case": case.__dict__, "kv_bytes_per_step": kv_bytes, "threads": {}}
    for n in threads:
        torch.set_num_threads(n)
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in paths}
        for r in range(reps + 1):
            for name in paths if r % 2 == 0 else reversed(paths):
                impl.model.use_kernels(paths[name])
                spent.clear()
                t0 = time.perf_counter()
                impl.step(batch)
                if r:  # the first round warms up
                    times[name].append((time.perf_counter() - t0, sum(spent)))
        med = {k: {"step_ms": 1e3 * statistics.median(s for s, _ in v),
                   "attention_ms": 1e3 * statistics.median(a for _, a in v)}
               for k, v in times.items()}  # fmt: skip
        for m in med.values():
            m["attention_gb_per_s"] = kv_bytes / m["attention_ms"] / 1e6
        result["threads"][str(n)] = {
            "load_avg_after": os.getloadavg(),
            "median": med,
            "attention_speedup": med["torch"]["attention_ms"] / med["native"]["attention_ms"],
            "step_speedup": med["torch"]["step_ms"] / med["native"]["step_ms"],
            "raw_ms": {k: [[round(1e3 * s, 3), round(1e3 * a, 3)] for s, a in v]
                       for k, v in times.items()},  # fmt: skip
        }
        nat, tor = med["native"], med["torch"]
        print(f"{case.name:28s} threads={n} attention: torch {tor['attention_ms']:6.1f} ms, "
              f"native {nat['attention_ms']:6.1f} ms ({nat['attention_gb_per_s']:.1f} GB/s); "
              f"step: torch {tor['step_ms']:6.1f} ms, native {nat['step_ms']:6.1f} ms",
              flush=True)  # fmt: skip
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", default="2,1")
    decodes = [c.name for c in CASES if c.mode == "decode"]
    ap.add_argument("--cases", default=",".join(decodes))
    ap.add_argument("--output", type=Path,
                    default=Path("benchmarks/results/cpu_decode_attention.json"))  # fmt: skip
    args = ap.parse_args()
    wanted = args.cases.split(",")
    cases = [c for c in CASES if c.name in wanted and c.mode == "decode"]
    if len(cases) != len(wanted):
        ap.error(f"--cases: choose from {', '.join(decodes)}")
    if cpu_kernels.attention_library() is None:
        ap.error("the native kernel is unavailable (see the log above)")
    threads = [int(t) for t in args.threads.split(",")]
    result = {"benchmark": "cpu_decode_attention", "commit": commit(), "machine": machine(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "reps": args.reps,
              "cases": [run_case(c, threads, args.reps) for c in cases]}  # fmt: skip
    result["machine"]["load_avg_at_end"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
