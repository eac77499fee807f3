"""Perplexity and top-1 agreement of each quantization scheme on a fixed English corpus.

The corpus is assembled from text every Debian machine has offline: the license texts in
/usr/share/common-licenses, in a fixed order, cut to --tokens tokens (default 20,480) and
split into windows of --window tokens. Each window is one prompt; the engine returns every
prompt token's log-probability and its top-1 token (`prompt_logprobs=1`), prefilled in chunks
of --chunk tokens so that later chunks read earlier keys and values back from the KV cache
(otherwise an FP8 KV cache would never be read). Top-1 agreement is the share of positions
whose top-1 token equals the unquantized (first) configuration's, and `perplexity_vs_reference` the
perplexity's change against that first configuration (fp32 or, first in --configs, bf16).

    python benchmarks/quant_perplexity.py /work/models/hf/SmolLM2-135M-Instruct \
        --out benchmarks/results/quant_perplexity_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import time
from pathlib import Path

LICENSES = ["GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "LGPL-2.1", "Artistic", "CC0-1.0",
            "BSD"]  # fmt: skip
# LLM keywords per configuration (dtype float32 unless given). "int8" quantizes the output head
# too where that is the default (CPUs with the W8A8 kernel); "-lm_head-off" keeps it unquantized.
CONFIGS = {
    "fp32": {},
    "int8": {"quantization": "int8"},
    "int8-lm_head-off": {"quantization": "int8", "lm_head_quantized": False},
    "int4": {"quantization": "int4"},
    "fp8": {"quantization": "fp8"},
    "fp32+fp8-kv": {"kv_cache_dtype": "fp8"},
    "bf16": {"dtype": "bfloat16"},
    "int8-bf16": {"dtype": "bfloat16", "quantization": "int8"},
    "int8-bf16-lm_head-off": {"dtype": "bfloat16", "quantization": "int8",
                              "lm_head_quantized": False},
}


def corpus_text() -> str:
    root = Path("/usr/share/common-licenses")
    return "\n\n".join((root / name).read_text() for name in LICENSES)


def score(model: str, options: dict, windows: list[list[int]], chunk: int) -> dict:
    from soberana import LLM, SamplingParams

    t0 = time.time()
    llm = LLM(model, **{"dtype": "float32", "kv_cache_gb": 0.5,
                        "max_model_len": len(windows[0]) + 8, "max_num_seqs": 8,
                        "max_num_batched_tokens": chunk, **options})  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1, detokenize=False)
    outs = llm.generate(windows, params, use_tqdm=False)
    nll, top1 = 0.0, []
    for window, out in zip(windows, outs):
        for token, entry in zip(window[1:], out.prompt_logprobs[1:]):
            nll -= entry[token].logprob
            top1.append(next(t for t, lp in entry.items() if lp.rank == 1))
    n = len(top1)
    info = llm.engine.model_info
    return {"perplexity": math.exp(nll / n), "tokens_scored": n, "seconds": time.time() - t0,
            "quantization": info.quantization, "kernels": info.quantization_kernels,
            "kv_cache_dtype": info.kv_cache_dtype, "top1": top1}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=20480)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reference", type=Path, help="the unquantized run's perplexity and top-1 "
                    "tokens: written by a run whose first config is fp32, read by a later run "
                    "that scores only quantized configs (same model, corpus and window)")
    args = ap.parse_args()
    from soberana.models.tokenizer import load_tokenizer

    ids = load_tokenizer(args.model).encode(corpus_text())
    if len(ids) < args.tokens:
        raise SystemExit(f"corpus has {len(ids)} tokens, fewer than --tokens {args.tokens}")
    ids = ids[: args.tokens - args.tokens % args.window]
    windows = [ids[i:i + args.window] for i in range(0, len(ids), args.window)]
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo")
                  if ln.startswith("flags")), [])  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    result = {"model": args.model, "commit": commit.strip(), "cpu": cpu,
              "loadavg_start": open("/proc/loadavg").read().split()[:3],
              "cpu_flags": [f for f in flags if f.startswith(("avx512", "avx2", "amx"))],
              "corpus": [f"/usr/share/common-licenses/{n}" for n in LICENSES],
              "tokens": len(ids), "window": args.window, "chunk": args.chunk, "results": {}}
    reference, base = None, None
    if args.reference and args.reference.exists():
        saved = json.loads(args.reference.read_text())
        reference, base = saved["top1"], saved["perplexity"]
        result["reference"] = {"file": str(args.reference), "perplexity": base,
                               "commit": saved["commit"]}  # fmt: skip
    for name in args.configs.split(","):
        r = score(args.model, CONFIGS[name], windows, args.chunk)
        top1 = r.pop("top1")
        if reference is None:
            reference, base = top1, r["perplexity"]
            if args.reference:
                args.reference.write_text(json.dumps({"commit": result["commit"],
                                                      "perplexity": base, "top1": top1}))  # fmt: skip
        r["top1_agreement"] = sum(a == b for a, b in zip(top1, reference)) / len(top1)
        r["perplexity_vs_reference"] = r["perplexity"] / base - 1
        result["results"][name] = r
        result["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
        print(name, json.dumps(r), flush=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
