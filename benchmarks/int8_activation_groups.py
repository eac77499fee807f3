"""How many inputs may share one int8 activation scale: perplexity of int8 W8A8 with a scale
per token (what `torch._int_mm` allows: one int32 sum per row), per group of 128 (the GPU
kernel, ops/triton/quant_gemm.py) and per 32 (the CPU kernel), and of W8A16, against fp32.

Emulated in float32 with transformers on a CPU: every decoder projection's weight is
dequantized from its per-channel int8 codes and its input from the per-group int8 codes
(`schemes.quantize_int8_per_token`); the output head stays fp32. The corpus and windows are
benchmarks/quant_perplexity.py's (its engine run gave the same fp32 and W8A16 perplexities).

    python benchmarks/int8_activation_groups.py /work/models/hf/SmolLM2-135M-Instruct \
        --out benchmarks/results/int8_activation_groups_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.quant_perplexity import corpus_text
from soberana.quantization import schemes

# name -> inputs per activation scale (None: the whole row; 0: activations not quantized)
VARIANTS = {"per_token": None, "group128": 128, "group32": 32, "w8a16": 0}


def fake_quant(x: torch.Tensor, group: int | None) -> torch.Tensor:
    """x with each row rounded to int8 per `group` inputs (64 or less where 128 does not
    divide the width, as the GPU layers choose), back in float."""
    k = x.shape[-1]
    rows = x.reshape(-1, k).float()
    group = k if group is None else schemes.group_size_for(k, group)
    q, scale = schemes.quantize_int8_per_token(rows, group)
    deq = q.float().reshape(rows.shape[0], -1, group) * scale[:, :, None]
    return deq.reshape(x.shape).to(x.dtype)


def perplexity(model_dir: str, windows: list[list[int]], group: int | None | bool
               ) -> tuple[float, torch.Tensor]:  # fmt: skip
    """(perplexity, top-1 ids) with the projections quantized (group False: fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if group is not False:
        for lin in (m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)):
            lin.weight.data = schemes.dequantize_int8(*schemes.quantize_int8(lin.weight.data))
            if group != 0:
                lin.forward = (lambda x, lin=lin: F.linear(fake_quant(x, group), lin.weight,
                                                           lin.bias))  # fmt: skip
    nll, n, top1 = 0.0, 0, []
    with torch.no_grad():
        for w in windows:
            logp = model(torch.tensor([w])).logits[0, :-1].float().log_softmax(-1)
            nll -= logp[torch.arange(len(w) - 1), torch.tensor(w[1:])].sum().item()
            n += len(w) - 1
            top1.append(logp.argmax(-1))
    return math.exp(nll / n), torch.cat(top1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from benchmarks.gpu.engine_h200 import commit
    from soberana.models.tokenizer import load_tokenizer

    ids = load_tokenizer(args.model).encode(corpus_text())[: args.tokens]
    windows = [ids[i:i + args.window] for i in range(0, len(ids) - args.window + 1, args.window)]
    t0 = time.time()
    base, top_ref = perplexity(args.model, windows, False)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.machine())  # fmt: skip
    res = {"model": args.model, "commit": commit(), "cpu": cpu,
           "tokens": len(windows) * args.window, "window": args.window, "fp32": base}  # fmt: skip
    for name in args.variants.split(","):
        ppl, top = perplexity(args.model, windows, VARIANTS[name])
        res[name] = {"perplexity": ppl, "vs_fp32": ppl / base - 1,
                     "top1_agreement": (top == top_ref).float().mean().item()}  # fmt: skip
        print(name, res[name], flush=True)
    res["seconds"] = time.time() - t0
    args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
