"""One CPU model step, old code vs new code, in one process with interleaved repetitions.

"Old" is `soberana/ops/{attention,layers}.py` and `soberana/models/transformer.py` as of a
git revision (default HEAD), loaded from `git show` under private module names; "new" is the
working tree. Both models hold the same random weights and start from the same KV cache
(blocks scattered over the pool, as after some churn), and a step is what the engine runs:
build the attention metadata, the forward, the logits of the sampled rows, the greedy pick.
Old and new alternate repetition by repetition, so load from other processes on a shared
machine hits both alike; medians are reported per thread count.

    python benchmarks/cpu_decode_step.py                 # default cases, 2 and 1 threads
    python benchmarks/cpu_decode_step.py --baseline abc123 --reps 21
    python benchmarks/cpu_decode_step.py --profile decode_bf16_64x192 --threads 2
    python benchmarks/cpu_decode_step.py --baseline 11fee17~1   # native CPU decode attention
                                                                # vs the PyTorch path before it
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_throughput import SHAPES, commit, machine  # noqa: E402

from soberana.models import transformer as new_transformer  # noqa: E402
from soberana.models.config import ModelConfig  # noqa: E402
from soberana.ops import attention as new_attention  # noqa: E402

# The modules a step runs that this comparison swaps, in import order (dependencies first).
SWAPPED = {
    "soberana.ops.attention": "soberana/ops/attention.py",
    "soberana.ops.layers": "soberana/ops/layers.py",
    "soberana.models.transformer": "soberana/models/transformer.py",
}


@dataclass
class Case:
    """One measured situation: `mode` decode (one new token per sequence) or prefill."""

    name: str
    mode: str
    dtype: str
    num_seqs: int
    context: str  # "N" or "LO:HI" (uniform per sequence): tokens after this step
    shape: str = "llama-125m"


CASES = [
    Case("decode_bf16_64x192", "decode", "bfloat16", 64, "192"),
    Case("decode_bf16_64x48-768", "decode", "bfloat16", 64, "48:768"),
    Case("decode_fp32_64x192", "decode", "float32", 64, "192"),
    Case("decode_bf16_gqa_300m_64x192", "decode", "bfloat16", 64, "192", "llama-300m"),
    Case("prefill_bf16_16x128", "prefill", "bfloat16", 16, "128"),
    Case("prefill_bf16_64x128", "prefill", "bfloat16", 64, "128"),
]


def load_baseline(ref: str) -> tuple[ModuleType, ModuleType]:
    """(attention, transformer) modules of `ref`, importing each other under private names."""
    mods: dict[str, ModuleType] = {}
    for name, path in SWAPPED.items():
        src = subprocess.run(["git", "show", f"{ref}:{path}"], capture_output=True, text=True,
                             check=True).stdout
        for dep in SWAPPED:
            src = src.replace(f"from {dep} import", f"from _baseline_{dep.replace('.', '_')} import")
        private = f"_baseline_{name.replace('.', '_')}"
        spec = importlib.util.spec_from_loader(private, loader=None)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[private] = mod
        exec(compile(src, f"{ref}:{path}", "exec"), mod.__dict__)
        mods[name] = mod
    return mods["soberana.ops.attention"], mods["soberana.models.transformer"]


class Impl:
    """A model built from one version of the code, with its own copy of the KV cache."""

    def __init__(self, attention: ModuleType, transformer: ModuleType, cfg: ModelConfig,
                 state: dict, kv_cache: torch.Tensor, dtype: torch.dtype) -> None:
        self.attention = attention
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            self.model = transformer.CausalLM(cfg, max_positions=4096).eval()
        finally:
            torch.set_default_dtype(previous)
        self.model.load_state_dict(state, strict=False)  # rotary tables are not in the state
        self.kv_cache = kv_cache.clone()
        workspace = getattr(attention, "GatherWorkspace", None)
        self.workspace = workspace() if workspace is not None else None

    @torch.inference_mode()
    def step(self, batch: dict) -> torch.Tensor:
        """The engine's step: metadata, forward, logits of the sampled rows, greedy pick."""
        meta = self.attention.AttentionMetadata(**batch["meta"], workspace=self.workspace)
        hidden = self.model(batch["input_ids"], batch["positions"], self.kv_cache, meta)
        logits = self.model.compute_logits(hidden[batch["sample_rows"]])
        logits.argmax(dim=-1).tolist()
        return logits


def _lengths(spec: str, n: int, g: torch.Generator) -> list[int]:
    if ":" not in spec:
        return [int(spec)] * n
    lo, hi = (int(x) for x in spec.split(":"))
    return torch.randint(lo, hi + 1, (n,), generator=g).tolist()


def make_batch(case: Case, cfg: ModelConfig, block_size: int, g: torch.Generator
               ) -> tuple[dict, torch.Tensor]:
    """The step's inputs in the engine's layout, and a KV cache filled with random values."""
    seq_lens = _lengths(case.context, case.num_seqs, g)
    q_lens = [1] * len(seq_lens) if case.mode == "decode" else list(seq_lens)
    blocks = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks) + 8
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks):
        table[i, :n] = perm[used:used + n].to(torch.int32)
        used += n
    positions = torch.cat([torch.arange(s - q, s) for s, q in zip(seq_lens, q_lens)])
    req = torch.repeat_interleave(torch.arange(len(seq_lens)), torch.tensor(q_lens))
    slots = table[req, positions // block_size].long() * block_size + positions % block_size
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(q_lens).cumsum(0)
    dtype = getattr(torch, case.dtype)
    kv_cache = torch.randn(cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads,
                           cfg.head_dim, generator=g).to(dtype)
    batch = {
        "input_ids": torch.randint(0, cfg.vocab_size, (len(positions),), generator=g),
        "positions": positions,
        "sample_rows": (cu[1:] - 1).long(),
        "meta": dict(slot_mapping=slots, query_start_loc=cu,
                     seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_table=table,
                     num_decodes=len(seq_lens) if case.mode == "decode" else 0,
                     query_lens_cpu=q_lens, seq_lens_cpu=seq_lens),
    }
    return batch, kv_cache


def random_state(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """Weights as the dummy loader makes them: N(0, 0.02), norms at 1."""
    g = torch.Generator().manual_seed(0)
    model = new_transformer.CausalLM(cfg, max_positions=16)
    state = {}
    for name, p in model.named_parameters():
        value = torch.ones(p.shape) if name.endswith("norm.weight") else torch.randn(
            p.shape, generator=g) * 0.02
        state[name] = value.to(dtype)
    return state


def run_case(case: Case, baseline: tuple[ModuleType, ModuleType], threads: list[int],
             reps: int) -> dict:
    cfg = ModelConfig.from_hf({**SHAPES[case.shape], "architectures": ["LlamaForCausalLM"],
                               "max_position_embeddings": 4096})
    dtype = getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(0)
    batch, kv_cache = make_batch(case, cfg, 16, g)
    state = random_state(cfg, dtype)
    impls = {"old": Impl(*baseline, cfg, state, kv_cache, dtype),
             "new": Impl(new_attention, new_transformer, cfg, state, kv_cache, dtype)}
    del kv_cache
    ref, out = impls["old"].step(batch), impls["new"].step(batch)
    result = {
        "case": case.__dict__,
        "max_abs_logit_diff": (ref - out).abs().max().item(),
        "same_greedy_tokens": torch.equal(ref.argmax(-1), out.argmax(-1)),
        "threads": {},
    }
    for n in threads:
        torch.set_num_threads(n)
        times: dict[str, list[float]] = {k: [] for k in impls}
        for r in range(reps + 1):
            # Alternate which one goes first, so neither always follows the other's traffic.
            order = list(impls) if r % 2 == 0 else list(reversed(impls))
            for name in order:
                t0 = time.perf_counter()
                impls[name].step(batch)
                if r:  # the first round of each thread count warms up
                    times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        result["threads"][str(n)] = {
            "load_avg_after": os.getloadavg(),
            "median_ms": {k: 1e3 * v for k, v in med.items()},
            "speedup": med["old"] / med["new"],
            "raw_ms": {k: [round(1e3 * t, 3) for t in v] for k, v in times.items()},
        }
        print(f"{case.name:32s} threads={n} old {1e3 * med['old']:8.1f} ms  new "
              f"{1e3 * med['new']:8.1f} ms  x{med['old'] / med['new']:.2f}  "
              f"(max |dlogit| {result['max_abs_logit_diff']:.3g})", flush=True)
    return result


def profile_case(case: Case, baseline: tuple[ModuleType, ModuleType], threads: int,
                 steps: int = 5) -> str:
    """torch.profiler tables (top ops by self time) of a few steps, old then new."""
    from torch.profiler import profile

    cfg = ModelConfig.from_hf({**SHAPES[case.shape], "architectures": ["LlamaForCausalLM"],
                               "max_position_embeddings": 4096})
    dtype = getattr(torch, case.dtype)
    batch, kv_cache = make_batch(case, cfg, 16, torch.Generator().manual_seed(0))
    state = random_state(cfg, dtype)
    torch.set_num_threads(threads)
    report = [f"{case.name}, {threads} threads, {steps} steps, load {os.getloadavg()}"]
    for name, mods in (("old", baseline), ("new", (new_attention, new_transformer))):
        impl = Impl(*mods, cfg, state, kv_cache, dtype)
        for _ in range(3):
            impl.step(batch)
        with profile() as prof:
            for _ in range(steps):
                impl.step(batch)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        report.append(f"== {name}\n{table}")
        del impl
    return "\n".join(report)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="eeb3f97",
                    help="git revision of the old code (default: the commit before the new CPU path)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", default="2,1")
    ap.add_argument("--cases", default=",".join(c.name for c in CASES))
    ap.add_argument("--output", type=Path, default=Path("benchmarks/results/cpu_decode_step.json"))
    ap.add_argument("--profile", metavar="CASE",
                    help="instead of timing, print profiler tables of CASE at the first --threads")
    args = ap.parse_args()
    wanted = args.cases.split(",")
    cases = [c for c in CASES if c.name in wanted]
    if len(cases) != len(wanted):
        ap.error(f"--cases: choose from {', '.join(c.name for c in CASES)}")
    threads = [int(t) for t in args.threads.split(",")]
    if args.profile:
        case = next((c for c in CASES if c.name == args.profile), None)
        if case is None:
            ap.error(f"--profile: choose from {', '.join(c.name for c in CASES)}")
        print(profile_case(case, load_baseline(args.baseline), threads[0]))
        return 0
    baseline_sha = subprocess.run(["git", "rev-parse", args.baseline], capture_output=True,
                                  text=True, check=True).stdout.strip()
    baseline = load_baseline(args.baseline)
    result = {"benchmark": "cpu_decode_step", "new_commit": commit(), "old_commit": baseline_sha,
              "machine": machine(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "reps": args.reps,
              "cases": [run_case(c, baseline, threads, args.reps)
                        for c in cases]}
    result["machine"]["load_avg_at_end"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
