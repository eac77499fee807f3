"""CPU decode speed of int8 (W8A8 and weight-only W8A16) against float32 and bfloat16, real
weights, one run.

Loads the model (default SmolLM2-135M-Instruct) once per configuration, all in this process,
then alternates the configurations round by round (a shared, loaded host drifts; alternating
puts every configuration under the same drift) for:
  - batch 1: one prompt, --output-len greedy tokens (ignore_eos),
  - batched: --batch prompts at once, --output-len tokens each.
Reported: output tokens per second (prefill included; prompts are short), the median and
every round. Written with commit, CPU model + flags, thread count and the load average
before and after (os.getloadavg), so a number from a busy machine says so.

Peer in the same run (--llama-batched-bench and --gguf): llama.cpp's `llama-batched-bench` on a
Q8_0 GGUF of the same model, run between our rounds with the same prompt length, output length,
batch sizes and thread count; its number is output tokens / total time (prefill included), the
same quantity as ours.

    python benchmarks/quant_cpu.py --out benchmarks/results/quant_cpu_smollm2_zen4.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

CONFIGS = {
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "int8": {"dtype": "bfloat16", "quantization": "int8"},
    "int8_w8a16": {"dtype": "bfloat16", "quantization": "int8_w8a16"},
}


def cpu_info() -> dict:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
                 platform.processor())  # fmt: skip
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    return {"cpu": model, "cpus": os.cpu_count(),
            "cpu_flags": [f for f in flags if f.startswith(("avx512", "avx2", "amx", "fma"))]}  # fmt: skip


def llama_cpp_round(binary: Path, gguf: Path, args: argparse.Namespace, threads: int) -> dict:
    """One llama-batched-bench call: output tok/s for batch 1 and --batch sequences."""
    cmd = [str(binary), "-m", str(gguf), "-c", str(args.batch * (args.input_len + args.output_len) + 64),
           "-b", "2048", "-ub", "512", "-npp", str(args.input_len), "-ntg", str(args.output_len),
           "-npl", f"1,{args.batch}", "-t", str(threads), "--output-format", "jsonl"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    by_pl = {row["pl"]: row for row in rows}
    return {"batch1": args.output_len / by_pl[1]["t"],
            "batched": args.batch * args.output_len / by_pl[args.batch]["t"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/work/models/hf/SmolLM2-135M-Instruct")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch and llama.cpp threads (0: torch's default). On a shared, loaded "
                         "host 1 thread avoids OpenMP barrier stalls that swamp both engines")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--llama-batched-bench", type=Path, default=None,
                    help="llama.cpp's llama-batched-bench binary (the Q8_0 peer)")
    ap.add_argument("--gguf", type=Path, default=None, help="Q8_0 GGUF of --model for the peer")
    args = ap.parse_args()
    from soberana import LLM, SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.configs.split(",")
    load_before = os.getloadavg()
    llms = {}
    for name in names:
        llms[name] = LLM(args.model, kv_cache_gb=0.25, max_model_len=args.input_len + args.output_len + 8,
                         max_num_seqs=max(args.batch, 1), **CONFIGS[name])  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    vocab = 49152
    prompts = [torch.randint(100, vocab - 100, (args.input_len,), generator=gen).tolist()
               for _ in range(args.batch)]  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True,
                            detokenize=False)  # fmt: skip
    for llm in llms.values():  # warm-up: builds, first-touch pages
        llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                     use_tqdm=False)  # fmt: skip
    peer = args.llama_batched_bench is not None and args.gguf is not None
    rounds: dict[str, dict[str, list[float]]] = {
        n: {"batch1": [], "batched": []} for n in names + (["llama.cpp Q8_0"] if peer else [])}
    if peer:  # warm-up: page the GGUF in
        subprocess.run([str(args.llama_batched_bench), "-m", str(args.gguf), "-c", "256", "-npp", "8",
                        "-ntg", "4", "-npl", "1", "-t", str(torch.get_num_threads())],
                       capture_output=True, check=True)  # fmt: skip
    for r in range(args.rounds):
        for kind, batch in (("batch1", prompts[:1]), ("batched", prompts)):
            for name in names if r % 2 == 0 else names[::-1]:
                t0 = time.perf_counter()
                outs = llms[name].generate(batch, params, use_tqdm=False)
                dt = time.perf_counter() - t0
                tokens = sum(len(o.outputs[0].token_ids) for o in outs)
                rounds[name][kind].append(tokens / dt)
                print(f"round {r} {kind:8s} {name:5s} {tokens / dt:8.1f} tok/s", flush=True)
        if peer:
            for kind, v in llama_cpp_round(args.llama_batched_bench, args.gguf, args,
                                           torch.get_num_threads()).items():  # fmt: skip
                rounds["llama.cpp Q8_0"][kind].append(v)
                print(f"round {r} {kind:8s} llama.cpp Q8_0 {v:8.1f} tok/s", flush=True)
    load_after = os.getloadavg()
    peer_info = None
    if peer:
        version = subprocess.run([str(args.llama_batched_bench), "--version"], capture_output=True,
                                 text=True).stderr.strip()  # fmt: skip
        peer_info = {"binary": str(args.llama_batched_bench), "gguf": str(args.gguf),
                     "version": version, "threads": torch.get_num_threads(),
                     "metric": "pl*ntg / t (llama-batched-bench total time, prefill included)"}  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    info = {n: {"quantization": llm.engine.model_info.quantization,
                "kernels": llm.engine.model_info.quantization_kernels} for n, llm in llms.items()}  # fmt: skip
    result = {
        "model": args.model, "commit": commit.strip(), **cpu_info(),
        "torch_threads": torch.get_num_threads(), "load_average_before": load_before,
        "load_average_after": load_after, "batch": args.batch, "input_len": args.input_len,
        "output_len": args.output_len, "rounds": args.rounds, "configs": CONFIGS, "engines": info,
        "peer": peer_info,
        "tok_per_s": {n: {k: {"median": statistics.median(v), "all": v} for k, v in d.items()}
                      for n, d in rounds.items()},
    }  # fmt: skip
    med = {n: {k: statistics.median(v) for k, v in d.items()} for n, d in rounds.items()}
    if "int8" in med and "bf16" in med:
        result["int8_over_bf16"] = {k: med["int8"][k] / med["bf16"][k] for k in med["int8"]}
    if "int8" in med and "fp32" in med:
        result["int8_over_fp32"] = {k: med["int8"][k] / med["fp32"][k] for k in med["int8"]}
    if "int8" in med and "llama.cpp Q8_0" in med:
        result["int8_over_llama_cpp_q8_0"] = {k: med["int8"][k] / med["llama.cpp Q8_0"][k]
                                              for k in med["int8"]}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in result if k.startswith("int8_over")}, indent=1))


if __name__ == "__main__":
    main()
