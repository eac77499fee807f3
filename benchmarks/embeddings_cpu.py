"""Embedding throughput on this CPU: `soberana serve` through HTTP against sentence-transformers
in-process, on the same sentences and model.

10,000 sentences of 8-256 tokens (words drawn from licence texts installed on the machine)
are embedded by sentence-transformers' `encode` (batch 32, its default; it sorts inputs by
length, so its padding waste is small) in a fresh process, in float32 and (`--st-dtypes`) in
bfloat16 (`model.to(torch.bfloat16)`), and by a real `soberana serve` process through HTTP by
an asyncio client (aiohttp, or httpx) at a fixed concurrency, with 1 or 32 sentences per
request, as JSON floats or base64 (what the official `openai` client asks for by default).
All share the machine's cores: the client, the API process and the engine core included.
Reports sentences/s, the ratios to each sentence-transformers run, latency percentiles and
the cosine agreement with sentence-transformers in float32.

    python benchmarks/embeddings_cpu.py --model /path/to/all-MiniLM-L6-v2 --out benchmarks/results/
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import re
import shlex
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from offline_throughput import commit, machine  # noqa: E402

ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def corpus_words() -> list[str]:
    """Words of the licence texts that ship with installed packages (English prose)."""
    words: list[str] = []
    for path in sorted(Path(sys.prefix).rglob("LICENSE*"))[:400]:
        try:
            words += re.findall(r"[A-Za-z][A-Za-z'-]+[.,;]?", path.read_text(errors="ignore"))
        except OSError:
            continue
    return words


def sentences(tokenizer, n: int, lo: int, hi: int, seed: int) -> list[str]:
    words = corpus_words()
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        target = rng.randint(lo, hi)
        start = rng.randrange(len(words) - 400)
        text = " ".join(words[start:start + int(target * 0.8) + 1])
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) > target:  # cut to the drawn length (special tokens kept)
            text = tokenizer.decode(ids[1:target - 1])
        if lo <= len(tokenizer(text)["input_ids"]) <= hi:
            out.append(text)
    return out


def corpus(model: str, num: int, lengths: str, out_dir: Path) -> tuple[list[str], dict, str]:
    """`num` sentences of `lengths` ("LO:HI") tokens, their token counts (mean, min, max) and
    the file in `out_dir` they are written to (sentence-transformers' process reads it)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    lo, hi = (int(x) for x in lengths.split(":"))
    texts = sentences(tok, num, lo, hi, seed=0)
    counts = [len(tok(t)["input_ids"]) for t in texts]
    out_dir.mkdir(parents=True, exist_ok=True)
    texts_file = str(out_dir / ".embeddings_texts.json")
    Path(texts_file).write_text(json.dumps(texts))
    return texts, {"mean": statistics.mean(counts), "min": min(counts), "max": max(counts)}, texts_file


def run_sentence_transformers(model: str, texts_file: str, batch_size: int,
                              dtype: str = "float32") -> dict:
    code = f"""
import json, time, torch
from sentence_transformers import SentenceTransformer
texts = json.load(open({texts_file!r}))
m = SentenceTransformer({model!r}, device="cpu").to(torch.{dtype})
m.encode(texts[:64], batch_size={batch_size})
t0 = time.perf_counter()
v = m.encode(texts, batch_size={batch_size}, convert_to_tensor=True)
dt = time.perf_counter() - t0
json.dump({{"seconds": dt, "sample": v[:64].float().tolist()}}, open({texts_file!r} + ".st.json", "w"))
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return json.loads(Path(texts_file + ".st.json").read_text())


async def run_server(url: str, texts: list[str], concurrency: int, per_request: int,
                     encoding: str, client: str) -> dict:
    chunks = [texts[i:i + per_request] for i in range(0, len(texts), per_request)]
    latencies: list[float] = []
    vectors: dict[int, list[float]] = {}
    queue: asyncio.Queue = asyncio.Queue()
    post = _aiohttp_post if client == "aiohttp" else _httpx_post

    async def worker(session) -> None:
        while not queue.empty():
            i, chunk = queue.get_nowait()
            t0 = time.perf_counter()
            data = await post(session, f"{url}/v1/embeddings",
                              {"input": chunk, "encoding_format": encoding})
            latencies.append(time.perf_counter() - t0)
            if i * per_request < 64:
                for j, d in enumerate(data["data"]):
                    vectors[i * per_request + j] = _vector(d["embedding"])

    async with _session(client, concurrency) as session:
        for i, chunk in enumerate(chunks[:4 * concurrency]):  # warm-up
            queue.put_nowait((i, chunk))
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        for i, chunk in enumerate(chunks):
            queue.put_nowait((i, chunk))
        latencies.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
    latencies.sort()
    pct = {f"p{p}": latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))]
           for p in (50, 95, 99)}
    return {"seconds": seconds, "latency_s": pct,
            "sample": [vectors[i] for i in range(min(64, len(texts)))]}


def _session(client: str, concurrency: int):
    if client == "aiohttp":
        import aiohttp

        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                     timeout=aiohttp.ClientTimeout(total=600))
    import httpx

    return httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency))


async def _aiohttp_post(session, url: str, body: dict) -> dict:
    async with session.post(url, json=body) as r:
        r.raise_for_status()
        return await r.json()


async def _httpx_post(session, url: str, body: dict) -> dict:
    r = await session.post(url, json=body)
    r.raise_for_status()
    return r.json()


def _vector(embedding: list[float] | str) -> list[float]:
    if isinstance(embedding, str):  # base64: little-endian float32
        raw = base64.b64decode(embedding)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    return embedding


def start_server(model: str, log: Path, dtype: str = "auto",
                 flags: Sequence[str] = ()) -> tuple[subprocess.Popen, str]:  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "soberana.cli", "serve", model, "--port", "0",
                             "--disable-uvicorn-access-log", "--dtype", dtype, *flags],
                            stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        found = re.search(r"ready: serving .* at (http://[\d.:]+)/v1", log.read_text())
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(0.5)
    raise TimeoutError(log.read_text())


def cosine_min(a: list[list[float]], b: list[list[float]]) -> float:
    def cos(x, y):
        dot = sum(p * q for p, q in zip(x, y))
        return dot / ((sum(p * p for p in x) ** 0.5) * (sum(q * q for q in y) ** 0.5))

    return min(cos(x, y) for x, y in zip(a, b))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--num", type=int, default=10_000)
    ap.add_argument("--lengths", default="8:256")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--per-request", default="1,32")
    ap.add_argument("--dtypes", default="float32",
                    help="server dtypes, one server each (bfloat16: AVX512_BF16 linears)")
    ap.add_argument("--st-dtypes", default="float32,bfloat16",
                    help="sentence-transformers dtypes (float32 first: the cosine reference)")
    ap.add_argument("--server-flags", default="",
                    help="';'-separated sets of extra `soberana serve` flags, one server each "
                         "(e.g. '--cpu-isa avx2;--cpu-isa avx2 --compute-backend torch')")
    ap.add_argument("--encodings", default="float", help="encoding_format: float, base64")
    ap.add_argument("--client", default="aiohttp", choices=("aiohttp", "httpx"))
    ap.add_argument("--again", action="store_true",
                    help="sentence-transformers float32 again at the end (load drift)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    out_dir = Path(args.out)
    texts, tokens, texts_file = corpus(args.model, args.num, args.lengths, out_dir)
    result = {"commit": commit(), "machine": machine(), "model": args.model,
              "num_sentences": len(texts), "tokens": tokens, "concurrency": args.concurrency,
              "runs": []}
    # PyTorch's and oneDNN's ISA caps (an AVX2-only CPU emulated on an AVX-512 host)
    result["environment"] = {k: os.environ.get(k) for k in ISA_ENV}
    st_runs = {}
    for dtype in args.st_dtypes.split(","):
        st_runs[dtype] = run_sentence_transformers(args.model, texts_file, 32, dtype)
        print(f"sentence-transformers {dtype}: {len(texts) / st_runs[dtype]['seconds']:.1f} "
              "sentences/s", flush=True)
    reference = st_runs["float32"]["sample"]
    result["sentence_transformers"] = {
        dtype: {"batch_size": 32, "seconds": st["seconds"],
                "sentences_per_s": len(texts) / st["seconds"],
                "min_cosine_vs_float32": cosine_min(st["sample"], reference)}
        for dtype, st in st_runs.items()}
    result["client"] = args.client
    result["text_embeddings_inference"] = (
        "not run: not on PyPI (`pip download text-embeddings-inference`: no matching "
        "distribution) and no network beyond the package index")
    log = out_dir / ".embeddings_server.log"
    servers = [(dtype, flags) for dtype in args.dtypes.split(",")
               for flags in args.server_flags.split(";")]
    for dtype, flags in servers:
        proc, url = start_server(args.model, log, dtype, shlex.split(flags))
        try:
            for per_request in (int(x) for x in args.per_request.split(",")):
                for encoding in args.encodings.split(","):
                    run = asyncio.run(run_server(url, texts, args.concurrency, per_request,
                                                 encoding, args.client))
                    result["runs"].append({
                        "dtype": dtype, "server_flags": flags,
                        "sentences_per_request": per_request,
                        "encoding_format": encoding, "seconds": run["seconds"],
                        "sentences_per_s": len(texts) / run["seconds"],
                        "vs_sentence_transformers": {
                            d: st["seconds"] / run["seconds"] for d, st in st_runs.items()},
                        "request_latency_s": run["latency_s"],
                        "min_cosine_vs_sentence_transformers_float32": cosine_min(
                            run["sample"], reference),
                    })
                    print(json.dumps(result["runs"][-1]), flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
        result.setdefault("server_log_lines", []).extend(
            line for line in log.read_text().splitlines()
            if "Compute backend" in line or "Slower path" in line or "loaded in" in line
            or "encoder" in line.lower())
    if args.again:  # a host whose load changed during the run shows it here
        again = run_sentence_transformers(args.model, texts_file, 32)
        result["sentence_transformers_float32_again"] = {
            "seconds": again["seconds"], "sentences_per_s": len(texts) / again["seconds"]}
    result["load_avg_at_end"] = os.getloadavg()
    for f in (texts_file, texts_file + ".st.json"):
        os.unlink(f)
    name = f"embeddings_cpu{('_' + args.tag) if args.tag else ''}.json"
    (out_dir / name).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
