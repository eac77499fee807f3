"""Which int4 quantizer loses least: perplexity of fake-quantized weights in transformers.

Each decoder projection is replaced by dequantize(quantize(W)) for one int4 variant (the
embedding and output head stay as they are, as the engine leaves them), and the model scores
a slice of quant_perplexity.py's corpus in windows of 512 tokens, with top-1 agreement
against the unquantized model. Faster than the engine for comparing quantizers; the shipped
scheme's number comes from quant_perplexity.py.

    python benchmarks/int4_variants.py MODEL TOKENS rtn,float_zero,... [--bf16-copy]

Variants (groups of 128 inputs, 64/32 where 128 does not divide the width, as the engine):
  rtn               min..max round to nearest, integer (uint8) zero point, so 0.0 is on the
                    grid: the on-the-fly scheme (schemes.quantize_int4)
  float_zero        the same min..max grid with a fractional zero point (0.0 off the grid)
  float_zero_hqq    fractional zero point optimised by HQQ (Badri & Shaji 2023: l_p error,
                    p = 0.7, beta 10, kappa 1.01, 20 steps, best per group kept)
  float_zero_refit  fractional zero point and scale refitted by least squares (5 rounds)
                    (tried as the on-the-fly scheme on branch h2int4, not merged: see
                    docs/quantization.md)
  rtn_scale_refit   integer zero point, scale refitted by least squares (5 rounds)
  rtn_down_int8     rtn, down_proj in int8 per channel (mixed precision, as llama.cpp's
                    Q4_K_M keeps ffn_down at 6 bits in half the layers)
  NAME@G            variant NAME with groups of G
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from quant_perplexity import corpus_text  # noqa: E402

from soberana.quantization import schemes  # noqa: E402


def _grid(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = g.amin(2, keepdim=True), g.amax(2, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-10)
    return scale, -lo / scale


def _hqq_zero(g, scale, zero, steps=20, p=0.7, beta=10.0, kappa=1.01):
    best, best_err = zero, torch.full_like(zero, float("inf"))
    for _ in range(steps):
        q = torch.round(g / scale + zero).clamp(0, 15)
        resid = g - (q - zero) * scale
        err = resid.abs().mean(2, keepdim=True)
        better = err < best_err
        best, best_err = torch.where(better, zero, best), torch.where(better, err, best_err)
        mag = resid.abs()
        sparse = resid.sign() * (mag - mag.clamp(min=1e-12).pow(p - 1) / beta).clamp(min=0)
        zero = (q - (g - sparse) / scale).mean(2, keepdim=True)
        beta *= kappa
    return best


def _refit(g, scale, zero, integer_zero, rounds=5):
    """Alternate nearest codes and the least-squares scale (and zero point) for them."""
    w_mean = g.mean(2, keepdim=True)
    for _ in range(rounds):
        q = torch.round(g / scale + zero).clamp(0, 15)
        if integer_zero:
            d = q - zero
            den = (d * d).sum(2, keepdim=True)
            scale = torch.where(den > 0, (g * d).sum(2, keepdim=True) / den.clamp(min=1e-12),
                                scale).clamp(min=1e-10)  # fmt: skip
            continue
        q_mean = q.mean(2, keepdim=True)
        q_var = (q * q).mean(2, keepdim=True) - q_mean * q_mean
        cov = (q * (g - w_mean)).mean(2, keepdim=True)
        fits = q_var > 1e-6
        new_scale = torch.where(fits, cov / q_var.clamp(min=1e-6), scale).clamp(min=1e-10)
        zero = torch.where(fits, q_mean - w_mean / new_scale, zero)
        scale = new_scale
    return scale, zero


def fake_quant(w: torch.Tensor, variant: str, name: str) -> torch.Tensor:
    base, _, group = variant.partition("@")
    group = schemes.group_size_for(w.shape[1], int(group or schemes.INT4_GROUP_SIZE))
    if base == "rtn_down_int8" and name.endswith("down_proj.weight"):
        return schemes.dequantize_int8(*schemes.quantize_int8(w))
    if base in ("rtn", "rtn_down_int8"):
        return schemes.dequantize_int4(*schemes.quantize_int4(w, group))
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    scale, zero = _grid(g)
    if base == "float_zero_hqq":
        zero = _hqq_zero(g, scale, zero)
    elif base == "float_zero_refit":
        scale, zero = _refit(g, scale, zero, integer_zero=False)
    elif base == "rtn_scale_refit":
        scale, zero = _refit(g, scale, zero.round().clamp(0, 15), integer_zero=True)
    elif base != "float_zero":
        raise SystemExit(f"unknown variant {variant!r}")
    q = torch.round(g / scale + zero).clamp(0, 15)
    return ((q - zero) * scale).reshape(n, k)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("tokens", type=int)
    ap.add_argument("variants")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--bf16-copy", action="store_true",
                    help="keep the original weights in bfloat16 (a bf16 checkpoint: exact)")
    args = ap.parse_args()
    ids = AutoTokenizer.from_pretrained(args.model)(corpus_text())["input_ids"][:args.tokens]
    windows = [ids[i:i + 512] for i in range(0, len(ids) - len(ids) % 512, 512)]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    keep = torch.bfloat16 if args.bf16_copy else torch.float32
    orig = {n: p.detach().to(keep).clone() for n, p in model.named_parameters()
            if ".layers." in n and p.dim() == 2}  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    result = {"model": args.model, "commit": commit.stdout.strip(), "tokens": len(ids),
              "window": 512, "loadavg_start": open("/proc/loadavg").read().split()[:3],
              "results": {}}  # fmt: skip
    reference = None
    for variant in ["none"] + args.variants.split(","):
        t0 = time.time()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in orig:
                    w = orig[n].float()
                    p.copy_(w if variant == "none" else fake_quant(w, variant, n))
        quant_s = time.time() - t0
        nll, top1 = 0.0, []
        with torch.no_grad():
            for window in windows:
                x = torch.tensor([window])
                logp = model(x).logits[0, :-1].log_softmax(-1)
                nll -= float(logp.gather(1, x[0, 1:, None]).sum())
                top1.append(logp.argmax(-1))
        top1 = torch.cat(top1)
        reference = top1 if reference is None else reference
        ppl = math.exp(nll / len(top1))
        base = result["results"].get("none", {}).get("perplexity", ppl)
        result["results"][variant] = {
            "perplexity": ppl, "vs_unquantized": ppl / base - 1, "quantize_s": quant_s,
            "top1_agreement": float((top1 == reference).float().mean())}  # fmt: skip
        result["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
        print(variant, json.dumps(result["results"][variant]), flush=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
