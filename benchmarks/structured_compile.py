"""Grammar compile time and per-token mask time of llguidance and xgrammar, on the same 120
JSON schemas (benchmarks/schemas/real_world.py) and the same tokenizer, in one run.

Compile: a fresh compilation of each schema (no cache), wall time, p50/p99.
Mask: for each schema, a walk of up to 48 tokens where each next token is drawn at random
from the allowed set; the time of every next-token mask (one sequence, vocab-sized bitmask):
wall time, and the thread's CPU time (what the mask costs when the thread is not preempted:
on a loaded shared host the wall p99 is the scheduler's time slice, not the mask).

    python benchmarks/structured_compile.py [--tokenizer DIR] [--out PATH]

DIR defaults to a real Qwen2 tokenizer (151k vocabulary) from fetch.sh when present
(/work/models/tokenizers/qwen2), else the demo model's (934 tokens).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.schemas.real_world import schemas  # noqa: E402

STEPS = 48


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def cpu_flags() -> list[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return [f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx"))]
    return []


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summary(values_s: list[float]) -> dict:
    ms = [v * 1e3 for v in values_s]
    return {"n": len(ms), "p50_ms": pct(ms, 0.5), "p90_ms": pct(ms, 0.9), "p99_ms": pct(ms, 0.99),
            "max_ms": max(ms), "mean_ms": statistics.fmean(ms)}


def allowed(bitmask_row: torch.Tensor, vocab: int) -> list[int]:
    bits = ((bitmask_row.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten()
    return bits[:vocab].nonzero().flatten().tolist()


def bench_llguidance(tokenizer, vocab: int, eos: int, items) -> dict:
    import llguidance
    import llguidance.hf
    from llguidance.torch import fill_next_token_bitmask

    t0 = time.perf_counter()
    ll_tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=[eos])
    setup = time.perf_counter() - t0
    compile_s, mask_s, cpu_s, first_s, errors = [], [], [], [], 0
    rng = random.Random(0)
    for _, schema in items:
        t = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "lenient": True})
        matcher = llguidance.LLMatcher(ll_tok, grammar, log_level=0)
        compile_s.append(time.perf_counter() - t)
        if matcher.is_error():
            errors += 1
            continue
        bitmask = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)
        for step in range(STEPS):
            t, c = time.perf_counter(), time.thread_time()
            fill_next_token_bitmask(matcher, bitmask, 0)
            cpu_s.append(time.thread_time() - c)
            mask_s.append(time.perf_counter() - t)
            if step == 0:
                first_s.append(mask_s[-1])
            ok = allowed(bitmask[0], vocab)
            token = rng.choice(ok)
            if token == eos or not matcher.consume_token(token) or matcher.is_stopped():
                break
    return {"tokenizer_setup_s": setup, "compile": summary(compile_s), "mask": summary(mask_s),
            "mask_thread_cpu": summary(cpu_s), "mask_first_of_schema": summary(first_s),
            "errors": errors}


def bench_xgrammar(tokenizer, vocab: int, eos: int, items) -> dict:
    import xgrammar

    t0 = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[eos])
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
    setup = time.perf_counter() - t0
    compile_s, mask_s, cpu_s, errors = [], [], [], 0
    rng = random.Random(0)
    for _, schema in items:
        t = time.perf_counter()
        try:
            compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        except Exception:
            errors += 1
            continue
        compile_s.append(time.perf_counter() - t)
        matcher = xgrammar.GrammarMatcher(compiled)
        bitmask = xgrammar.allocate_token_bitmask(1, vocab)
        for _ in range(STEPS):
            t, c = time.perf_counter(), time.thread_time()
            matcher.fill_next_token_bitmask(bitmask, 0)
            cpu_s.append(time.thread_time() - c)
            mask_s.append(time.perf_counter() - t)
            token = rng.choice(allowed(bitmask[0], vocab))
            if token == eos or not matcher.accept_token(token) or matcher.is_terminated():
                break
    return {"tokenizer_setup_s": setup, "compile": summary(compile_s), "mask": summary(mask_s),
            "mask_thread_cpu": summary(cpu_s), "errors": errors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_tok = Path("/work/models/tokenizers/qwen2")
    ap.add_argument("--tokenizer", default=str(default_tok) if default_tok.is_dir() else None)
    ap.add_argument("--out", default="benchmarks/results/structured_compile.json")
    args = ap.parse_args()
    from soberana.models.tokenizer import load_tokenizer

    if args.tokenizer is None:
        from soberana.models.demo import demo_model_path

        args.tokenizer = str(demo_model_path())
    tokenizer = load_tokenizer(args.tokenizer)
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else vocab - 1
    items = schemas()
    torch.set_num_threads(1)
    result = {
        "tokenizer": args.tokenizer, "vocab": vocab, "schemas": len(items),
        "cpu": cpu_model(), "torch_threads": 1, "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "loadavg_before": Path("/proc/loadavg").read_text().split()[:3],
        "llguidance": bench_llguidance(tokenizer, vocab, eos, items),
        "xgrammar": bench_xgrammar(tokenizer, vocab, eos, items),
        "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
    }
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
