"""Fake-quant int4 variants on a real model with transformers; perplexity on a token slice."""
import json
import math
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, "/work/wt/h2int4")
sys.path.insert(0, "/work/wt/h2int4/benchmarks")
import werr2lib as L
from quant_perplexity import corpus_text

torch.set_num_threads(2)
MODEL = sys.argv[1]; NTOK = int(sys.argv[2]); VARIANTS = sys.argv[3].split(",")
tok = AutoTokenizer.from_pretrained(MODEL)
ids = tok(corpus_text())["input_ids"][:NTOK]
W = 512
windows = [ids[i:i+W] for i in range(0, len(ids) - len(ids) % W, W)]
model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
import os

ODT = torch.bfloat16 if os.environ.get("ORIG_BF16") else torch.float32
orig = {n: p.detach().to(ODT).clone() for n, p in model.named_parameters() if "layers" in n and p.dim() == 2}

def group_for(k, g):
    for c in (g, 64, 32, 16):
        if c <= g and k % c == 0: return c

def shrink(x, beta, p):
    return torch.sign(x) * torch.relu(x.abs() - x.abs().clamp_min(1e-12).pow(p - 1) / beta)

def quant(w, g, mode, zdtype=None):
    n, k = w.shape
    gs = w.float().reshape(n, k // g, g)
    if mode in ("rtn_old", "C"):
        lo, hi = gs.amin(2).clamp(max=0), gs.amax(2).clamp(min=0)
    else:
        lo, hi = gs.amin(2), gs.amax(2)
    s = ((hi - lo) / 15).clamp(min=1e-12)[..., None]
    z = (-lo[..., None] / s)
    if mode in ("rtn_old", "D", "D_down8"):
        z = z.round().clamp(0, 15)
    if mode in ("E", "E2"):
        s0, z = s, z.round().clamp(0, 15)
        for _ in range(5):
            q = (gs / s + z).round().clamp(0, 15)
            if mode == "E2":
                s_ls, z_ls = L.lsfit(gs, q)
                z = torch.where(torch.isfinite(z_ls), z_ls.round().clamp(0, 15), z)
            d = q - z
            den = (d * d).sum(2, keepdim=True)
            s = torch.where(den > 0, (gs * d).sum(2, keepdim=True) / den.clamp(min=1e-12), s).clamp(min=1e-10)
    if mode == "sym":
        s = (gs.abs().amax(2) / 7.5).clamp(min=1e-12)[..., None]; z = torch.full_like(s, 7.5)
    if mode == "sym8":
        s = (gs.abs().amax(2) / 7).clamp(min=1e-12)[..., None]; z = torch.full_like(s, 8.0)
    if mode.startswith("hqq"):
        iters = 20
        beta, p, kappa = 10.0, 0.7, 1.01
        best = torch.full(z.shape, float("inf")); bestz = z.clone()
        for i in range(iters):
            q = (gs / s + z).round().clamp(0, 15)
            wr = (q - z) * s
            err = (gs - wr).abs().mean(2, keepdim=True)
            better = err < best
            best = torch.where(better, err, best); bestz = torch.where(better, z, bestz)
            e = shrink(gs - wr, beta, p)
            z = (q - (gs - e) / s).mean(2, keepdim=True)
            if mode == "hqq_k": beta *= kappa
        z = bestz
    if zdtype is not None:
        s = s.to(zdtype).float(); z = z.to(zdtype).float()
    q = (gs / s + z).round().clamp(0, 15)
    return ((q - z) * s).reshape(n, k)

from soberana.quantization import schemes as S


def quant2(w, g, mode):
    n, k = w.shape
    gs = w.float().reshape(n, k // g, g)
    lo, hi = gs.amin(2, keepdim=True), gs.amax(2, keepdim=True)
    s = (hi - lo) / 15; z = S._hqq_zero(gs, s, -lo / s)
    if "ls" in mode:
        s, z = L.alt(gs, s, z, 10)
    q = (gs / s + z).round().clamp(0, 15)
    return ((q - z) * s).reshape(n, k)

def apply(variant):
    mode, g, zd = (variant.split(":") + [""])[:3] if ":" in variant else (variant, "128", "")
    zdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "": None}[zd]
    err = []
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in orig:
                if mode == "none":
                    p.copy_(orig[n]); continue
                w = orig[n].float()
                if mode.endswith("down8") and "down_proj" in n:
                    q8, s8 = S.quantize_int8(w); dq = S.dequantize_int8(q8, s8)
                elif mode == "Scur":
                    p_, s_, z_ = S.quantize_int4(w, group_for(w.shape[1], int(g)))
                    dq = S.dequantize_int4(p_, s_, z_)
                elif mode.startswith("S"):
                    dq = quant2(w, group_for(w.shape[1], int(g)), mode)
                else:
                    dq = quant(w, group_for(w.shape[1], int(g)), mode, zdtype)
                err.append(float((dq - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()))
                p.copy_(dq)
    return sum(err) / max(1, len(err))

ref_top = None
res = {}
for v in VARIANTS:
    t0 = time.time(); rel = apply(v); tq = time.time() - t0
    nll, n, tops = 0.0, 0, []
    with torch.no_grad():
        for wd in windows:
            x = torch.tensor([wd])
            logp = model(x).logits[0, :-1].log_softmax(-1)
            tgt = x[0, 1:]
            nll -= float(logp.gather(1, tgt[:, None]).sum()); n += len(tgt)
            tops.append(logp.argmax(-1))
    tops = torch.cat(tops)
    ref_top = tops if ref_top is None else ref_top
    ppl = math.exp(nll / n)
    base = res.get(VARIANTS[0], {}).get("ppl", ppl)
    res[v] = {"ppl": ppl, "vs": ppl / base - 1, "top1": float((tops == ref_top).float().mean()), "rel_rms": rel, "quant_s": tq}
    print(v, json.dumps(res[v]), flush=True)
