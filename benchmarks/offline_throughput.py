"""Offline throughput of `LLM.generate` next to transformers on the same prompts, same run.

A Llama-shaped model with random weights (default ~134M parameters: the "125M Llama shape"
of the brief) is saved once; then, on identical random prompts with ignore_eos:
  - soberana `LLM.generate` (continuous batching, paged KV cache),
  - transformers `generate` on padded batches,
  - transformers `generate_batch` (its continuous-batching API), when available.
Each engine runs in a fresh process of its own (run in one process, transformers reused the
heap soberana's engine had grown and ran 7-10% faster than it does alone), on `--repeats`
prompt sets (the same lengths, fresh random tokens, so no run hits a prefix cached by
another); the ratio is of medians, and every run is kept.
`generate_batch`, ~4x slower than `generate` here, runs the first set only. Writes the raw
numbers plus commit, hardware and versions as JSON.

    python benchmarks/offline_throughput.py --num-prompts 64 --input-len 128 --output-len 128
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    "llama-125m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                       num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12),
    "llama-300m": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                       num_hidden_layers=20, num_attention_heads=16, num_key_value_heads=8),
}


def build_model(shape: str, root: Path, dtype: str) -> Path:
    """Save the random model in `dtype`, as real checkpoints are (Llama 3, Qwen: bfloat16)."""
    import transformers

    out = root / f"random-{shape}-{dtype}"
    if (out / "config.json").is_file():
        return out
    cfg = transformers.LlamaConfig(max_position_embeddings=4096, **SHAPES[shape])
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    tmp = out.with_suffix(".tmp")
    model.save_pretrained(tmp)
    from soberana.models.loader import resolve_model_path

    # the demo's tokenizer (its vocabulary fits the shape); None is now the real default model
    for f in resolve_model_path("demo").glob("tokenizer*"):
        (tmp / f.name).write_bytes(f.read_bytes())
    tmp.rename(out)
    return out


def _summary(runs: list[dict]) -> dict:
    """The median run's numbers (the upper middle of an even count), and every run."""
    mid = sorted(runs, key=lambda r: r["output_tok_s"])[len(runs) // 2]
    return {**mid, "runs": runs}


def _in_fresh_process(fn, *args) -> dict:
    """fn(*args) in a new interpreter (spawned), so no engine inherits another's state."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def _timed(n_out: int, t0: float) -> dict:
    dt = time.perf_counter() - t0
    return {"seconds": dt, "output_tokens": n_out, "output_tok_s": n_out / dt}


def run_soberana(path: Path, prompt_sets, warm_up, output_lens: list[int], max_num_seqs: int,
                 dtype: str, compute_backend: str = "auto") -> dict:
    from soberana import LLM, SamplingParams

    longest = max(len(p) for prompts in prompt_sets for p in prompts)
    llm = LLM(str(path), max_model_len=longest + max(output_lens) + 16,
              max_num_seqs=max_num_seqs, dtype=dtype, compute_backend=compute_backend)
    compute = llm.engine.model_info.compute
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)
              for n in output_lens]
    llm.generate(warm_up, params[0].clone(max_tokens=4), use_tqdm=False)
    runs = []
    for prompts in prompt_sets:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs.append(_timed(sum(len(o.outputs[0].token_ids) for o in outs), t0))
    del llm
    return {**_summary(runs), "compute": compute}


def run_hf_generate(path: Path, prompt_sets, warm_up, output_lens: list[int], batch_size: int,
                    dtype: str) -> dict:
    """Padded batches in input order; each batch generates up to its longest requested
    output, and only the requested tokens count (as vLLM's throughput benchmark does)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = None
    def batch_generate(batch, lens):
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        cfg = transformers.GenerationConfig(max_new_tokens=max(lens), do_sample=False,
                                            eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, generation_config=cfg)
        assert out.shape[1] - width == max(lens)
        return sum(lens)

    batch_generate(warm_up, [4] * len(warm_up))
    runs = []
    for prompts in prompt_sets:
        t0 = time.perf_counter()
        n_out = sum(batch_generate(prompts[i:i + batch_size], output_lens[i:i + batch_size])
                    for i in range(0, len(prompts), batch_size))
        runs.append(_timed(n_out, t0))
    return {**_summary(runs), "batch_size": batch_size}


def run_hf_generate_batch(path: Path, prompts, warm_up, output_lens: list[int],
                          dtype: str) -> dict:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype)).eval()
    if not hasattr(model, "generate_batch"):
        return {"skipped": "this transformers has no generate_batch"}
    # generate_batch takes one max_new_tokens: run to the longest, count what was requested.
    cfg = transformers.GenerationConfig(max_new_tokens=max(output_lens), do_sample=False,
                                        eos_token_id=None, pad_token_id=0)
    try:
        model.generate_batch(warm_up, generation_config=cfg.__class__(
            max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0))  # warm-up
        t0 = time.perf_counter()
        model.generate_batch(prompts, generation_config=cfg)
        dt = time.perf_counter() - t0
    except Exception as exc:  # record why the peer could not run rather than crash the run
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}
    n_out = sum(output_lens)
    return {"seconds": dt, "output_tokens": n_out, "output_tok_s": n_out / dt}


def _lengths(spec: str, n: int, g: torch.Generator) -> list[int]:
    if ":" not in spec:
        return [int(spec)] * n
    lo, hi = (int(x) for x in spec.split(":"))
    return torch.randint(lo, hi + 1, (n,), generator=g).tolist()


def _cpuinfo() -> dict:
    """Family, model and vector flags of the first CPU in /proc/cpuinfo ("AMD EPYC" alone does
    not tell Zen 4 from Zen 5, and this workplace's hosts have been both)."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        return {}
    flags = [f for f in fields.get("flags", "").split() if f.startswith(("avx512", "amx"))]
    return {"vendor": fields.get("vendor_id"), "family": fields.get("cpu family"),
            "model": fields.get("model"), "stepping": fields.get("stepping"), "flags": flags}


def gemm_gflops(dtype: torch.dtype, seconds: float = 0.3) -> float:
    """This host's rate on one decode-shaped matmul (64 x 768 by 768 x 3072, packed for oneDNN
    as the engine packs its linears, or plain F.linear where packing is unavailable): a
    yardstick for comparing runs on different hosts, which differ by up to 2.5x here."""
    from soberana.ops.cpu.linear import PackedLinear, packable

    x, w = torch.randn(64, 768, dtype=dtype), torch.randn(3072, 768, dtype=dtype)
    linear = PackedLinear(w, None) if packable(dtype) else (lambda a: torch.nn.functional.linear(a, w))
    for _ in range(10):
        linear(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        linear(x)
        n += 1
    return 2 * 64 * 768 * 3072 * n / (time.perf_counter() - t0) / 1e9


def machine() -> dict:
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines()
                  if line.startswith("Model name")), platform.processor())
    import transformers

    return {"cpu": model, "cpuinfo": _cpuinfo(), "cores": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "transformers": transformers.__version__, "python": platform.python_version(),
            "gemm_gflops_64x768x3072": {"bfloat16": gemm_gflops(torch.bfloat16),
                                        "float32": gemm_gflops(torch.float32)},
            "load_avg_at_start": os.getloadavg()}


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "soberana"],
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-125m")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", default="128", help="N, or LO:HI uniform per prompt")
    ap.add_argument("--output-len", default="128", help="N, or LO:HI uniform per prompt")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--hf-batch-size", type=int, default=64)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="checkpoint and compute dtype, the same for every engine")
    ap.add_argument("--repeats", type=int, default=3,
                    help="prompt sets each engine runs (generate_batch: the first only)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--compute-backend", choices=["auto", "native", "torch"], default="auto",
                    help="soberana's compute backend (torch: the portable PyTorch path)")
    ap.add_argument("--model-dir", type=Path, default=Path.home() / ".cache" / "soberana")
    ap.add_argument("--output", type=Path,
                    default=None, help="default: benchmarks/results/offline_throughput_cpu_DTYPE.json")
    args = ap.parse_args()

    ragged = ":" in args.input_len or ":" in args.output_len
    suffix = f"{args.dtype}_ragged" if ragged else args.dtype
    args.output = args.output or Path(f"benchmarks/results/offline_throughput_cpu_{suffix}.json")
    path = build_model(args.shape, args.model_dir, args.dtype)
    g = torch.Generator().manual_seed(0)
    vocab = SHAPES[args.shape]["vocab_size"]
    in_lens = _lengths(args.input_len, args.num_prompts, g)
    out_lens = _lengths(args.output_len, args.num_prompts, g)
    prompt_sets = [[torch.randint(0, vocab, (n,), generator=g).tolist() for n in in_lens]
                   for _ in range(args.repeats)]
    # warm-up prompts share no block with the measured ones (no prefix-cache hit)
    warm_up = [torch.randint(0, vocab, (24,), generator=g).tolist() for _ in range(2)]
    result = {"benchmark": "offline_throughput", "commit": commit(), "machine": machine(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "workload": {"shape": args.shape, "num_prompts": args.num_prompts,
                           "input_len": args.input_len, "output_len": args.output_len,
                           "dtype": args.dtype, "greedy": True, "ignore_eos": True,
                           "repeats": args.repeats, "each_engine_in_a_fresh_process": True},
              "soberana": _in_fresh_process(run_soberana, path, prompt_sets, warm_up, out_lens,
                                            args.max_num_seqs, args.dtype,
                                            args.compute_backend)}
    print("soberana", json.dumps(result["soberana"]), flush=True)
    if not args.skip_hf:
        result["hf_generate"] = _in_fresh_process(run_hf_generate, path, prompt_sets, warm_up,
                                                  out_lens, args.hf_batch_size, args.dtype)
        print("hf_generate", json.dumps(result["hf_generate"]), flush=True)
        result["hf_generate_batch"] = _in_fresh_process(run_hf_generate_batch, path,
                                                        prompt_sets[0], warm_up, out_lens,
                                                        args.dtype)
        print("hf_generate_batch", json.dumps(result["hf_generate_batch"]), flush=True)
        peers = [result[k].get("output_tok_s", 0) for k in ("hf_generate", "hf_generate_batch")]
        result["ratio_vs_faster_transformers"] = result["soberana"]["output_tok_s"] / max(peers)
        # run i of each on the same prompt set
        result["paired_ratios_vs_hf_generate"] = [
            a["output_tok_s"] / b["output_tok_s"]
            for a, b in zip(result["soberana"]["runs"], result["hf_generate"]["runs"])
        ]
        print(f"soberana / faster transformers = {result['ratio_vs_faster_transformers']:.2f}x "
              f"(medians; run by run vs generate: "
              f"{', '.join(f'{r:.2f}' for r in result['paired_ratios_vs_hf_generate'])})")
    result["machine"]["load_avg_at_end"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
