"""An encoder's forward in float32 and with `--quantization int8` / `int8_w8a16`: CPU time per
sentence on one thread and the cosine to float32, on the sentences of embeddings_cpu.py.

Process CPU time (`time.process_time`) of one thread, so that other jobs on a shared host
change it little; the model is built as `PoolingCore` builds it (compute backend, then the
layers' linears quantized, then the rest packed), batches of 16 packed sentences.

    python benchmarks/embeddings_quantized_forward.py --model /path/to/all-MiniLM-L6-v2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from embeddings_cpu import sentences  # noqa: E402
from offline_throughput import commit, machine  # noqa: E402


def build(model_dir: Path, quantization: str | None):
    from soberana.models.encoder import load_encoder
    from soberana.ops.backend import select_backend
    from soberana.ops.cpu import linear as cpu_linear
    from soberana.quantization import QuantizationConfig, quantize_loaded_linears

    model = load_encoder(model_dir, torch.float32, torch.device("cpu"))
    backend = select_backend("native", torch.device("cpu"), torch.float32)
    model.use_kernels(backend.kernels)
    kernels = []
    if quantization is not None:
        kernels = quantize_loaded_linears(model.layers, QuantizationConfig.named(quantization),
                                          backend.kernels)  # fmt: skip
        if model.fuse_int8_mlps():
            kernels.append("MLP fused (GELU + int8 activations)")
    cpu_linear.pack_linears(model)
    return model, kernels


def embed(model, pooling, ids: list[list[int]], batch: int) -> torch.Tensor:
    from soberana.models.encoder import PackedBatch
    from soberana.models.pooling import pool

    out = []
    with torch.inference_mode():
        for i in range(0, len(ids), batch):
            packed = PackedBatch.build(ids[i:i + batch], [None] * len(ids[i:i + batch]),
                                       model.position_offset, torch.device("cpu"))  # fmt: skip
            out.append(pool(model(packed), packed.seq_lens, pooling))
    return torch.cat(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--num", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="float32 and each scheme, alternating")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from soberana.models.pooling import PoolingConfig

    torch.set_num_threads(1)
    model_dir = Path(args.model)
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = [tok(t)["input_ids"] for t in sentences(tok, args.num, 8, 256, seed=0)]
    pooling = PoolingConfig.from_dir(model_dir)
    result = {"commit": commit(), "machine": machine(), "model": args.model,
              "num_sentences": len(ids), "mean_tokens": sum(map(len, ids)) / len(ids),
              "threads": 1, "clock": "process CPU time", "batch": args.batch, "runs": []}  # fmt: skip
    reference = None
    for round_ in range(args.rounds):
        for scheme in (None, "int8", "int8_w8a16"):
            model, kernels = build(model_dir, scheme)
            embed(model, pooling, ids[:args.batch], args.batch)  # warm-up
            t0 = time.process_time()
            vectors = embed(model, pooling, ids, args.batch)
            ms = 1e3 * (time.process_time() - t0) / len(ids)
            if reference is None:
                reference = vectors
            cos = torch.nn.functional.cosine_similarity(vectors, reference, dim=-1)
            run = {"round": round_, "quantization": scheme or "none (float32)",
                   "ms_per_sentence": ms, "kernels": kernels,
                   "cosine_vs_float32": {"min": cos.min().item(), "mean": cos.mean().item()}}  # fmt: skip
            result["runs"].append(run)
            print(json.dumps(run), flush=True)
    result["load_avg_at_end"] = os.getloadavg()
    out = Path(args.out) / f"embeddings_quantized_forward{('_' + args.tag) if args.tag else ''}.json"
    out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
