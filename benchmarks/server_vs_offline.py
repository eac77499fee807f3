"""Throughput through `soberana serve` at saturation next to offline `LLM.generate`, same run.

The same random token-id prompts (greedy, ignore_eos, fixed output length) go through:
  - offline: `LLM.generate` in this process (engine, detokenization, no HTTP);
  - http: every prompt sent at once to a `soberana serve` subprocess with the same engine
    settings, as non-streaming /v1/completions requests;
  - http-stream: the same with `stream: true` (one SSE event per token and request).
The three alternate for `--repeats` rounds so that drift on a shared machine hits all alike.
Writes the raw numbers plus commit, hardware and load average as JSON.

    python benchmarks/server_vs_offline.py                      # demo model (tiny, CPU)
    python benchmarks/server_vs_offline.py --shape llama-125m   # its body, the demo vocabulary
    python benchmarks/server_vs_offline.py --config benchmarks/gpu/model_configs/llama-3.1-8b.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_throughput import SHAPES, commit, machine  # noqa: E402


def build_model_for_demo_tokenizer(shape: str, root: Path) -> Path:
    """A random-weight Llama of `shape` whose vocabulary is the demo tokenizer's.

    offline_throughput's models keep a 32000-token vocabulary beside the demo tokenizer (934
    tokens): most generated ids would decode to nothing, and detokenization, which both sides
    do, would measure that mismatch instead of real text.
    """
    import torch
    import transformers

    from soberana.models.loader import resolve_model_path

    tokenizer_dir = resolve_model_path("demo")
    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    out = root / f"random-{shape}-vocab{vocab}"
    if (out / "config.json").is_file():
        return out
    cfg = transformers.LlamaConfig(max_position_embeddings=4096, **{**SHAPES[shape], "vocab_size": vocab})
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    tmp = out.with_suffix(".tmp")
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp)
    for f in tokenizer_dir.glob("tokenizer*"):
        (tmp / f.name).write_bytes(f.read_bytes())
    tmp.rename(out)
    return out


def config_model_dir(config_path: Path) -> Path:
    """A model directory for random weights (`load_format="dummy"`): the architecture of a
    Hugging Face config.json with the demo tokenizer's vocabulary, and that tokenizer."""
    from soberana.models.loader import resolve_model_path

    demo = resolve_model_path("demo")
    cfg = json.loads(config_path.read_text())
    demo_cfg = json.loads((demo / "config.json").read_text())
    for key in ("vocab_size", "bos_token_id", "eos_token_id"):
        cfg[key] = demo_cfg[key]
    out = Path(tempfile.mkdtemp(prefix=f"{config_path.stem}-demo-vocab-"))
    (out / "config.json").write_text(json.dumps(cfg))
    for f in demo.glob("tokenizer*"):
        (out / f.name).write_bytes(f.read_bytes())
    return out


def engine_flags(args: argparse.Namespace, max_model_len: int) -> dict:
    """Engine settings shared by both sides (LLM keyword -> value)."""
    flags = {"max_model_len": max_model_len, "max_num_seqs": args.max_num_seqs}
    if args.config is not None:
        flags["load_format"] = "dummy"
    if args.kv_cache_gb is not None:
        flags["kv_cache_gb"] = args.kv_cache_gb
    if args.device is not None:
        flags["device"] = args.device
    return flags


def run_offline(llm, prompts: list[list[int]], output_len: int) -> dict:
    from soberana import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"seconds": dt, "output_tokens": n_out, "output_tok_s": n_out / dt}


async def run_http(url: str, prompts: list[list[int]], output_len: int, stream: bool) -> dict:
    """Send every prompt at once; time from the first send to the last token received."""
    import aiohttp

    body = {"max_tokens": output_len, "temperature": 0, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    connector = aiohttp.TCPConnector(limit=len(prompts) + 8)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as session:

        async def one(prompt: list[int]) -> int:
            async with session.post("/v1/completions", json={**body, "prompt": prompt}) as resp:
                resp.raise_for_status()
                if not stream:
                    return (await resp.json())["usage"]["completion_tokens"]
                # Read whatever has arrived, not line by line: the load generator shares the
                # machine's cores with the server, so its per-event work is kept small. The
                # usage event (include_usage) comes last, before [DONE].
                tail = b""
                async for data in resp.content.iter_any():
                    tail = (tail + data)[-4096:]
                usage_event = tail[tail.rindex(b'data: {"'):].split(b"\n", 1)[0]
                return json.loads(usage_event[6:])["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(p) for p in prompts))
        dt = time.perf_counter() - t0
    n_out = sum(counts)
    return {"seconds": dt, "output_tokens": n_out, "output_tok_s": n_out / dt}


class Server:
    """`soberana serve` in a subprocess on a free loopback port."""

    def __init__(self, model: str | None, flags: dict, log: Path) -> None:
        cmd = [sys.executable, "-m", "soberana.cli", "serve", "--port", "0",
               "--disable-uvicorn-access-log"]  # fmt: skip
        if model is not None:
            cmd.insert(4, model)
        for key, value in flags.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        self.url = ""

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()}")
            found = re.search(r"listening on (http://\S+?);", self.log.read_text())
            if found:
                self.url = found.group(1)
                try:
                    if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def model_label(args: argparse.Namespace) -> str:
    if args.config is not None:
        return f"random {args.config.stem} (dummy weights), demo vocabulary"
    return f"random {args.shape}, demo vocabulary" if args.shape else "soberana-demo"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="random-weight Llama shape; default: the built-in demo model")
    ap.add_argument("--config", type=Path, default=None,
                    help="a Hugging Face config.json (e.g. benchmarks/gpu/model_configs/"
                         "llama-3.1-8b.json): its architecture, random weights, demo vocabulary")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--kv-cache-gb", type=float, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmups", type=int, default=2)
    ap.add_argument("--warmup-len", type=int, default=None, help="default: --output-len")
    ap.add_argument("--model-dir", type=Path, default=Path.home() / ".cache" / "soberana")
    ap.add_argument("--output", type=Path, default=None)
    ap.add_argument("--commit", default=None,
                    help="commit measured, where the checkout has no git history (device copies)")
    args = ap.parse_args()
    args.warmup_len = args.warmup_len or args.output_len

    import torch

    from soberana import LLM
    from soberana.models.loader import resolve_model_path

    if args.config is not None:
        path = config_model_dir(args.config)
        model_arg: str | None = str(path)
    elif args.shape:
        path = build_model_for_demo_tokenizer(args.shape, args.model_dir)
        model_arg = str(path)
    else:
        path, model_arg = resolve_model_path("demo"), "demo"
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    draws = iter(range(1_000_000))

    def fresh_prompts() -> list[list[int]]:
        """A new prompt set for every run: a repeated set would come from the prefix cache."""
        g = torch.Generator().manual_seed(next(draws))
        return [torch.randint(0, vocab, (args.input_len,), generator=g).tolist()
                for _ in range(args.num_prompts)]  # fmt: skip

    flags = engine_flags(args, args.input_len + args.output_len + 16)
    result = {
        "benchmark": "server_vs_offline",
        "commit": args.commit or commit(),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "workload": {"model": model_label(args), "num_prompts": args.num_prompts,
                     "input_len": args.input_len, "output_len": args.output_len,
                     "greedy": True, "ignore_eos": True, "engine": flags,
                     "prompts": "a fresh random set for every run (no prefix-cache reuse)",
                     "warmup_rounds": args.warmups, "warmup_output_len": args.warmup_len,
                     "client": "aiohttp, all requests at once"},
        "runs": {"offline": [], "http": [], "http_stream": []},
    }  # fmt: skip

    if torch.cuda.is_available() and args.device != "cpu":
        result["machine"]["gpu"] = torch.cuda.get_device_name()
    llm = LLM(model_arg, **flags)
    server = Server(model_arg, flags, Path(tempfile.mkdtemp()) / "server.log")
    try:
        server.wait_ready()
        # Warm-up: the full workload on both sides (allocators, CUDA graphs, kernels compiled
        # for the batch shapes that requests arriving over HTTP produce, CPU workspaces).
        for _ in range(args.warmups):
            run_offline(llm, fresh_prompts(), args.warmup_len)
            asyncio.run(run_http(server.url, fresh_prompts(), args.warmup_len, stream=False))
            asyncio.run(run_http(server.url, fresh_prompts(), args.warmup_len, stream=True))
        for r in range(args.repeats):
            for name, run in (
                ("offline", lambda p: run_offline(llm, p, args.output_len)),
                ("http", lambda p: asyncio.run(run_http(server.url, p, args.output_len, False))),
                ("http_stream", lambda p: asyncio.run(run_http(server.url, p, args.output_len, True))),
            ):
                outcome = run(fresh_prompts())
                outcome["load_avg"] = os.getloadavg()[0]
                result["runs"][name].append(outcome)
                print(f"round {r} {name:12s} {outcome['output_tok_s']:9.1f} tok/s "
                      f"({outcome['output_tokens']} tokens, {outcome['seconds']:.2f} s)", flush=True)
    finally:
        server.stop()

    medians = {k: statistics.median(x["output_tok_s"] for x in v) for k, v in result["runs"].items()}
    result["median_output_tok_s"] = medians
    result["http_over_offline"] = medians["http"] / medians["offline"]
    result["http_stream_over_offline"] = medians["http_stream"] / medians["offline"]
    print(f"http / offline = {result['http_over_offline']:.3f}; "
          f"http-stream / offline = {result['http_stream_over_offline']:.3f}")
    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    name = args.config.stem if args.config is not None else args.shape or "demo"
    output = args.output or Path(f"benchmarks/results/server_vs_offline_{name}_{device}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
