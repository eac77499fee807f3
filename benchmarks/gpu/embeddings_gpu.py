"""Embedding throughput on a GPU, BERT-base shape: `soberana serve` over HTTP, `LLM.embed`
offline, and the peer, in the same run (issue 24's GPU benchmark).

The model is written at start as a sentence-transformers directory (mean pooling): BERT-base's
shape (12 layers, hidden 768, 12 heads, FFN 3072, 512 positions) with random weights (seed 0)
and a real WordPiece tokenizer of bert-base-uncased's vocabulary (`--tokenizer`: the
all-MiniLM-L6-v2 directory's tokenizer files are it). `--n` sentences of 8-256 tokens (words
of the licence texts installed with Python's packages, benchmarks/embeddings_cpu.py) are
embedded, per dtype (float32, bfloat16):
  (a) by `soberana serve` through HTTP at `--concurrency` (16), 1 and 32 sentences a request;
  (b) by `LLM.embed` in a fresh process (all sentences in one call);
  (c) by the peer in a fresh process: sentence-transformers `encode(batch_size=32)` where it
      imports (it needs scipy and scikit-learn), else transformers `AutoModel` + mean pooling
      over padded batches of 32 sorted by length, as `encode` does (the output says which).
Every measurement is timed `--rounds` times after a warm-up; the best round is reported with
all rounds beside it. Each run's first 64 vectors are compared (cosine) with the float32 peer.

    python benchmarks/gpu/embeddings_gpu.py --tokenizer DIR --out benchmarks/results/gpu_h100/ \
        [--n 10000] [--rounds 1] [--commit SHA]

Smoke run on a CPU: `--device cpu --shape tiny --n 200`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))
from embeddings_cpu import corpus, cosine_min, run_server, start_server  # noqa: E402
from offline_throughput import commit  # noqa: E402

from tests.embeddings.tiny_encoders import (  # noqa: E402
    TOKENIZER_FILES,
    sentence_transformers_files,
)

SHAPES = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128),  # CPU smoke runs
}


def write_model(shape: str, tokenizer_dir: Path, out: Path) -> Path:
    """BERT of `shape` with random weights (seed 0) on bert-base-uncased's vocabulary, as a
    sentence-transformers directory with mean pooling."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, max_position_embeddings=512,
                                  type_vocab_size=2, **SHAPES[shape])  # fmt: skip
    cfg.architectures = ["BertModel"]
    out.mkdir(parents=True, exist_ok=True)
    transformers.BertModel(cfg).eval().save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            (out / name).write_bytes((tokenizer_dir / name).read_bytes())
    if not (out / "modules.json").exists():
        sentence_transformers_files(out, "mean", cfg.hidden_size, normalize=False)
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512}))
    return out


def worker(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process: `--worker offline` (LLM.embed) or `peer`."""
    import torch

    texts = json.loads(Path(args.texts).read_text())
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    if args.worker == "offline":
        from soberana import LLM

        llm = LLM(args.model, device=args.device, dtype=args.dtype)
        info = {"kind": "soberana LLM.embed", "compute": llm.engine.model_info.compute}

        def embed(batch: list[str]):
            return llm.embed(batch)
    else:
        embed, info = _peer(args.model, args.device, dtype)
    embed(texts[:256])  # warm-up: kernels chosen, allocator grown
    sync()
    seconds = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        vectors = embed(texts)
        sync()
        seconds.append(time.perf_counter() - t0)
    sample = [list(map(float, v)) for v in vectors[:64]]
    Path(args.result).write_text(json.dumps({**info, "seconds": seconds, "sample": sample}))


def _peer(model: str, device: str, dtype):
    """sentence-transformers' encode(batch_size=32) where it imports, else transformers."""
    import torch

    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        why = f"sentence-transformers not importable ({type(e).__name__}: {e})"
    else:
        st = SentenceTransformer(model, device=device).to(dtype)
        return (lambda batch: st.encode(batch, batch_size=32, convert_to_tensor=True).float().cpu(),
                {"kind": "sentence-transformers encode(batch_size=32)"})  # fmt: skip
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model)
    hf = transformers.AutoModel.from_pretrained(model, dtype=dtype).to(device).eval()

    @torch.inference_mode()
    def embed(batch: list[str]) -> torch.Tensor:
        order = sorted(range(len(batch)), key=lambda i: -len(batch[i]))  # as encode sorts
        out = torch.empty(len(batch), hf.config.hidden_size)
        for i in range(0, len(order), 32):
            idx = order[i:i + 32]
            enc = tok([batch[j] for j in idx], padding=True, truncation=True,
                      return_tensors="pt").to(device)  # fmt: skip
            hidden = hf(**enc).last_hidden_state
            mask = enc["attention_mask"][..., None].to(hidden.dtype)
            pooled = (hidden * mask).sum(1).float() / mask.sum(1).float()
            out[idx] = pooled.cpu()
        return out

    return embed, {"kind": "transformers AutoModel + mean pooling, batches of 32 sorted by "
                           f"length ({why})"}


def _in_fresh_process(kind: str, args: argparse.Namespace, model: Path, texts_file: str,
                      dtype: str) -> dict:  # fmt: skip
    result = Path(texts_file + f".{kind}.json")
    subprocess.run([sys.executable, __file__, "--worker", kind, "--model", str(model),
                    "--texts", texts_file, "--dtype", dtype, "--device", args.device,
                    "--rounds", str(args.rounds), "--result", str(result)], check=True)
    out = json.loads(result.read_text())
    result.unlink()
    return out


def _summary(n: int, seconds: list[float], sample: list, reference: list) -> dict:
    return {"seconds": min(seconds), "rounds_s": seconds, "sentences_per_s": n / min(seconds),
            "min_cosine_vs_peer_float32": cosine_min(sample, reference)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", type=Path, default=Path("/work/models/hf/all-MiniLM-L6-v2"),
                    help="a directory with bert-base-uncased's WordPiece (vocab.txt, "
                         "tokenizer.json): all-MiniLM-L6-v2's")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="bert-base")
    ap.add_argument("--n", type=int, default=10_000, help="sentences")
    ap.add_argument("--lengths", default="8:256")
    ap.add_argument("--rounds", type=int, default=1, help="timed rounds of each measurement")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--per-request", default="1,32")
    ap.add_argument("--dtypes", default="float32,bfloat16",
                    help="float32 first: the peer's float32 vectors are the cosine reference")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--commit", default=None, help="commit to record when the copy has no .git")
    ap.add_argument("--tag", default="")
    # a measurement in a fresh process (internal)
    ap.add_argument("--worker", choices=("offline", "peer"), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--texts", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    return run(args)


def run(args: argparse.Namespace) -> int:
    import torch
    import transformers

    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    # the weights (440 MB in float32 at BERT-base) stay out of --out, which comes back
    scratch = tempfile.TemporaryDirectory(prefix="embeddings_gpu_")
    model = write_model(args.shape, args.tokenizer, Path(scratch.name) / args.shape)
    t_model = time.perf_counter()
    texts, tokens, texts_file = corpus(str(model), args.n, args.lengths, args.out)
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    result = {"commit": args.commit or commit(), "gpu": gpu, "device": args.device,
              "torch": torch.__version__, "transformers": transformers.__version__,
              "python": platform.python_version(), "cpu_cores": os.cpu_count(),
              "shape": args.shape, "num_sentences": len(texts), "tokens": tokens,
              "concurrency": args.concurrency, "rounds": args.rounds, "peer": {},
              "offline": {}, "server": []}  # fmt: skip
    print(f"{len(texts)} sentences, tokens {tokens}; model written in {t_model - t_start:.0f}s, "
          f"sentences drawn in {time.perf_counter() - t_model:.0f}s", flush=True)
    dtypes = args.dtypes.split(",")
    peers = {d: _in_fresh_process("peer", args, model, texts_file, d) for d in dtypes}
    reference = peers[dtypes[0]]["sample"]
    for dtype, peer in peers.items():
        result["peer"][dtype] = {"kind": peer["kind"],
                                 **_summary(len(texts), peer["seconds"], peer["sample"], reference)}
        print(f"[{time.perf_counter() - t_start:.0f}s] peer {dtype}: {result['peer'][dtype]}",
              flush=True)
    for dtype in dtypes:
        offline = _in_fresh_process("offline", args, model, texts_file, dtype)
        result["offline"][dtype] = {
            "compute": offline["compute"],
            **_summary(len(texts), offline["seconds"], offline["sample"], reference),
            "vs_peer": min(peers[dtype]["seconds"]) / min(offline["seconds"])}
        print(f"[{time.perf_counter() - t_start:.0f}s] LLM.embed {dtype}: "
              f"{result['offline'][dtype]}", flush=True)
    client = "aiohttp" if _importable("aiohttp") else "httpx"
    result["client"] = client
    log = args.out / ".embeddings_gpu_server.log"
    for dtype in dtypes:
        proc, url = start_server(str(model), log, dtype, ["--device", args.device])
        try:
            for per_request in (int(x) for x in args.per_request.split(",")):
                rounds = [asyncio.run(run_server(url, texts, args.concurrency, per_request,
                                                 "float", client))
                          for _ in range(args.rounds)]  # fmt: skip
                best = min(rounds, key=lambda r: r["seconds"])
                run = {"dtype": dtype, "sentences_per_request": per_request,
                       **_summary(len(texts), [r["seconds"] for r in rounds], best["sample"],
                                  reference),
                       "request_latency_s": best["latency_s"],
                       "vs_peer": min(peers[dtype]["seconds"]) / best["seconds"]}
                result["server"].append(run)
                print(f"[{time.perf_counter() - t_start:.0f}s] serve {json.dumps(run)}",
                      flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
        result.setdefault("server_log_lines", []).extend(
            line for line in log.read_text().splitlines()
            if "Compute backend" in line or "Slower path" in line or "loaded in" in line)
    result["wall_s"] = time.perf_counter() - t_start
    os.unlink(texts_file)
    scratch.cleanup()
    name = f"embeddings_gpu_{args.shape}{('_' + args.tag) if args.tag else ''}.json"
    (args.out / name).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "server_log_lines"}, indent=1))
    print(f"wrote {args.out / name} in {result['wall_s']:.0f}s")
    return 0


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    raise SystemExit(main())
