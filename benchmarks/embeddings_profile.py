"""Where an embedding's CPU time goes: all-MiniLM-L6-v2, per sentence, on one thread.

Process CPU time (`time.process_time`) of one thread, so that other jobs on a shared host
change it little: sentence-transformers `encode` (batch 32) in float32 and bfloat16, and
soberana's encoder on packed batches of 16 sentences (the batches `soberana serve` forms at
concurrency 16) by op — the four linears, attention, add + LayerNorm, GELU — on the PyTorch
path (SDPA by length groups) and the native one (csrc/encoder_layers.c), in float32 and
bfloat16; and the API process's own work per one-sentence request: tokenization, pydantic
validation and the JSON (or base64) answer.

    python benchmarks/embeddings_profile.py --model /path/to/all-MiniLM-L6-v2 --out benchmarks/results/
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
from embeddings_cpu import ISA_ENV, sentences  # noqa: E402
from offline_throughput import commit, machine  # noqa: E402

cpu = time.process_time


def encoder_ops(model_dir: Path, ids: list[list[int]], dtype: torch.dtype, backend: str,
                batch: int, cpu_isa: str = "native", quantization: str | None = None) -> dict:
    """ms of CPU per sentence, in all and by op, of soberana's encoder on `backend` (its
    layers' linears quantized with `quantization` as `PoolingCore` quantizes them)."""
    from soberana.models.encoder import PackedBatch, load_encoder
    from soberana.models.pooling import PoolingConfig, pool
    from soberana.ops.backend import select_backend
    from soberana.ops.cpu import linear as cpu_linear
    from soberana.quantization import QuantizationConfig, quantize_loaded_linears

    model = load_encoder(model_dir, dtype, torch.device("cpu"))
    chosen = select_backend(backend, torch.device("cpu"), dtype, cpu_isa=cpu_isa)
    model.use_kernels(chosen.kernels)
    if quantization is not None:
        quantize_loaded_linears(model.layers, QuantizationConfig.named(quantization),
                                chosen.kernels)  # fmt: skip
        model.fuse_int8_mlps()
    if chosen.kernels.pack_cpu_linears:
        cpu_linear.pack_linears(model)
    pooling = PoolingConfig.from_dir(model_dir)
    spent: dict[str, float] = {}

    def timed(name: str, fn):
        def run(*args, **kwargs):
            t0 = cpu()
            out = fn(*args, **kwargs)
            spent[name] = spent.get(name, 0.0) + cpu() - t0
            return out
        return run

    for layer in model.layers:
        for name in ("qkv", "attn_out", "up", "down"):
            linear = getattr(layer, name)
            linear.forward = timed(f"linear {name}", linear.forward)
        layer.attention = timed("attention", layer.attention)
        layer.add_layer_norm = timed("add + LayerNorm", layer.add_layer_norm)
        layer.act_ = timed("GELU", layer.act_)
        if "mlp" in layer.__dict__:  # int8: the MLP fused into one call
            layer.mlp = timed("MLP (fused int8: up + GELU + down)", layer.mlp)

    def run_all(seqs: list[list[int]]) -> None:
        with torch.inference_mode():
            for i in range(0, len(seqs), batch):
                packed = PackedBatch.build(seqs[i:i + batch], [None] * len(seqs[i:i + batch]),
                                           model.position_offset, torch.device("cpu"))
                pool(model(packed), packed.seq_lens, pooling).tolist()

    run_all(ids[:batch])  # warm-up
    spent.clear()
    t0 = cpu()
    run_all(ids)
    total = cpu() - t0
    per = {name: 1e3 * s / len(ids) for name, s in sorted(spent.items(), key=lambda x: -x[1])}
    per["other (embeddings, pooling, Python)"] = 1e3 * (total - sum(spent.values())) / len(ids)
    return {"ms_per_sentence": 1e3 * total / len(ids), "by_op_ms": per,
            "implementations": chosen.implementations}


def sentence_transformers_ms(model_dir: Path, texts: list[str], dtype: torch.dtype) -> float:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir), device="cpu").to(dtype)
    st.encode(texts[:32], batch_size=32)
    t0 = cpu()
    st.encode(texts, batch_size=32)
    return 1e3 * (cpu() - t0) / len(texts)


def api_work_ms(model_dir: Path, texts: list[str]) -> dict:
    """The API process's per-request steps for one sentence (no HTTP, no engine)."""
    import orjson
    from transformers import AutoTokenizer

    from soberana.server.protocol_pooling import EmbeddingRequest
    from soberana.server.serving_pooling import _encode

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    vector = torch.randn(384).tolist()
    out = {}
    t0 = cpu()
    for text in texts:
        tok([text], add_special_tokens=True)
    out["tokenize"] = 1e3 * (cpu() - t0) / len(texts)
    t0 = cpu()
    for text in texts:
        EmbeddingRequest.model_validate({"input": text})
    out["validate request (pydantic)"] = 1e3 * (cpu() - t0) / len(texts)
    for fmt in ("float", "base64"):
        t0 = cpu()
        for _ in texts:  # as serving_pooling answers
            orjson.dumps({"object": "list", "data": [{"object": "embedding", "index": 0,
                                                       "embedding": _encode(vector, fmt)}]},
                         option=orjson.OPT_SERIALIZE_NUMPY)
        out[f"answer JSON ({fmt})"] = 1e3 * (cpu() - t0) / len(texts)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--num", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--cpu-isa", default="native", choices=("native", "avx2", "portable"),
                    help="the native kernels' build (avx2: the path of CPUs without AVX-512)")
    ap.add_argument("--skip-peers", action="store_true",
                    help="soberana's encoder only: no sentence-transformers, no API-process work")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    model_dir = Path(args.model)
    tok = AutoTokenizer.from_pretrained(args.model)
    texts = sentences(tok, args.num, 8, 256, seed=0)
    ids = tok(texts)["input_ids"]
    result = {"commit": commit(), "machine": machine(), "model": args.model,
              "num_sentences": len(texts), "mean_tokens": sum(map(len, ids)) / len(ids),
              "threads": 1, "clock": "process CPU time", "batch": args.batch,
              "cpu_isa": args.cpu_isa}
    # PyTorch's and oneDNN's ISA caps (an AVX2-only CPU emulated on an AVX-512 host)
    result["environment"] = {k: os.environ.get(k) for k in ISA_ENV}
    if not args.skip_peers:
        result["sentence_transformers_ms_per_sentence"] = {
            str(d).removeprefix("torch."): sentence_transformers_ms(model_dir, texts, d)
            for d in (torch.float32, torch.bfloat16)}
    result["soberana"] = {
        f"{str(d).removeprefix('torch.')} {backend}": encoder_ops(model_dir, ids, d, backend,
                                                                  args.batch, args.cpu_isa)
        for d in (torch.float32, torch.bfloat16) for backend in ("torch", "native")}
    result["soberana"]["float32 native --quantization int8"] = encoder_ops(
        model_dir, ids, torch.float32, "native", args.batch, args.cpu_isa, "int8")
    if not args.skip_peers:
        result["api_process_ms_per_request"] = api_work_ms(model_dir, texts)
    result["load_avg_at_end"] = os.getloadavg()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = f"embeddings_profile{('_' + args.tag) if args.tag else ''}.json"
    (Path(args.out) / name).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
