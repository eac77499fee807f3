"""Soberana's engine on one GPU with a full-size architecture (random bf16 weights).

Measures, in one run: the GPU's read bandwidth and bf16 matmul rate; start-up time by
phase; batch-1 decode tok/s and achieved bandwidth; offline throughput (1000 x 128/128,
1000 x 1024/128, 256 x 128/2048) with achieved TFLOP/s. Results go to --out/summary.json
(written after every phase, so a run cut short keeps what it measured).

    python benchmarks/gpu/engine_h200.py --config benchmarks/gpu/model_configs/llama-3.1-8b.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=HERE, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("SOBERANA_COMMIT", "unknown")


def ceilings() -> dict:
    """Read bandwidth (a reduction over 8 GB) and copy bandwidth; bf16 8192^3 matmul rate."""
    from triton.testing import do_bench

    n = 4 * 2**30  # 4 Gi bf16 elements = 8 GiB
    src = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms_read = do_bench(lambda: src.sum(dtype=torch.float32), warmup=100, rep=500,
                       return_mode="median")
    ms_copy = do_bench(lambda: dst.copy_(src), warmup=100, rep=500, return_mode="median")
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms_mm = do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    src = dst = a = b = None
    torch.cuda.empty_cache()
    nbytes = n * 2
    return {"read_bw_GBps": nbytes / ms_read / 1e6,
            "copy_bw_GBps_read_plus_write": 2 * nbytes / ms_copy / 1e6,
            "bf16_matmul_TFLOPs": 2 * 8192**3 / ms_mm / 1e9}


def model_dir(config_path: Path) -> Path:
    """A directory with the architecture's config.json and the demo tokenizer (ids only)."""
    from soberana.models.loader import resolve_model_path

    out = Path(tempfile.mkdtemp(prefix="soberana-bench-"))
    (out / "config.json").write_text(config_path.read_text())
    for f in resolve_model_path(None).glob("tokenizer*"):
        (out / f.name).write_bytes(f.read_bytes())
    return out


def demo_vocab_model_dir(config_path: Path) -> Path:
    """The architecture's body with the demo tokenizer's 934-id vocabulary, so every generated
    id decodes to text (TTFT over HTTP is measurable); the layers' cost is unchanged."""
    from soberana.models.loader import resolve_model_path

    cfg = json.loads(config_path.read_text())
    demo = json.loads((resolve_model_path(None) / "config.json").read_text())
    cfg.update(vocab_size=demo["vocab_size"], bos_token_id=demo["bos_token_id"],
               eos_token_id=demo["eos_token_id"])
    tmp = Path(tempfile.mkdtemp(prefix="soberana-cfg-")) / f"{config_path.stem}-demo-vocab.json"
    tmp.write_text(json.dumps(cfg))
    return model_dir(tmp)


def startup(path: Path, max_model_len: int, max_num_seqs: int) -> dict:
    """Wall time from `python` start to an engine ready to serve, in a fresh process."""
    code = (
        "import time, json; t0 = time.time()\n"
        "from soberana import LLM\n"
        f"llm = LLM({str(path)!r}, load_format='dummy', max_model_len={max_model_len}, "
        f"max_num_seqs={max_num_seqs})\n"
        "print('READY', json.dumps(dict(llm.engine.worker.startup, in_process_s=time.time() - t0)))\n"
    )
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    wall = time.time() - t0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("READY")), None)
    if line is None:
        return {"error": proc.stderr[-2000:]}
    phases = json.loads(line.split(" ", 1)[1])
    return {"startup_s": wall, **phases}


def weight_bytes(cfg: dict) -> int:
    """Bytes read per decode step for the weights: all but the embedding table (bf16)."""
    h, i, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // heads
    per_layer = h * (heads * d + 2 * kv * d) + heads * d * h + 3 * h * i + 2 * h
    return 2 * (L * per_layer + h + cfg["vocab_size"] * h)  # + final norm + lm_head


def kv_bytes_per_token(cfg: dict) -> int:
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * cfg["num_hidden_layers"] * kv * d * 2


def decode_bs1(llm, cfg: dict, prompt_len: int = 128, new_tokens: int = 256) -> dict:
    from soberana import SamplingParams
    from soberana.engine.outputs import EngineCoreRequest

    core = llm.engine
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True,
                            detokenize=False)
    prompt = torch.randint(0, cfg["vocab_size"], (prompt_len,)).tolist()
    core.add_request(EngineCoreRequest("bs1", prompt, params, time.time()))
    core.step()  # prefill + first token
    times = []
    while core.has_unfinished_requests():
        t = time.perf_counter()
        core.step()  # ends with the sampled id copied to the host: a full sync
        times.append(time.perf_counter() - t)
    times.sort()
    step = times[len(times) // 2]
    graph_ms = None
    graphs = core.runner.graphs
    if graphs is not None:  # the device's own time for one bs-1 forward (no host work)
        from triton.testing import do_bench

        graph_ms = do_bench(graphs.graphs[1].replay, warmup=20, rep=200, return_mode="median")
    avg_ctx = prompt_len + new_tokens / 2
    bytes_per_token = weight_bytes(cfg) + avg_ctx * kv_bytes_per_token(cfg)
    return {"decode_bs1_tok_s": 1 / step, "step_ms_p50": step * 1e3,
            "graph_replay_ms": graph_ms, "async_scheduling": core.async_scheduling,
            "step_ms_p90": times[int(len(times) * 0.9)] * 1e3,
            "bytes_per_token": bytes_per_token, "achieved_GBps": bytes_per_token / step / 1e9}


_CALLS: list[None] = []


def offline(llm, cfg: dict, n: int, input_len: int, output_len: int) -> dict:
    from soberana import SamplingParams

    # Fresh prompts on every call: a repeated workload would hit the prefix cache.
    _CALLS.append(None)
    g = torch.Generator().manual_seed(len(_CALLS) * 100_003 + n * 7 + input_len)
    prompts = [torch.randint(0, cfg["vocab_size"], (input_len,), generator=g).tolist()
               for _ in range(n)]
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True,
                            detokenize=False)
    core = llm.engine
    step, steps = core.step, []

    def timed_step():  # per-step wall time and shape: where the run's time goes
        t = time.perf_counter()
        out = step()
        steps.append((time.perf_counter() - t, len(core.scheduler.running)))
        return out

    core.step = timed_step
    hits_before = core.get_stats().prefix_cache_hits
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        core.step = step
    dt = time.perf_counter() - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    flops = matmul_flops(cfg, n, input_len, output_len)
    return {"num_prompts": n, "input_len": input_len, "output_len": output_len,
            "seconds": dt, "output_tokens": out_tokens, "output_tok_s": out_tokens / dt,
            "total_tok_s": (out_tokens + n * input_len) / dt, "achieved_TFLOPs": flops / dt / 1e12,
            "num_steps": len(steps), "steps_s": sum(t for t, _ in steps),
            "step_ms_p50": 1e3 * sorted(t for t, _ in steps)[len(steps) // 2],
            "running_p50": sorted(r for _, r in steps)[len(steps) // 2],
            "prefix_cache_hit_tokens": core.get_stats().prefix_cache_hits - hits_before}


def matmul_flops(cfg: dict, n: int, input_len: int, output_len: int) -> float:
    """Model FLOPs: 2 x weights per token (lm_head only where a token is sampled) plus causal
    attention (QK^T and PV)."""
    h, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    d = cfg.get("head_dim") or h // heads
    body = weight_bytes(cfg) / 2 - cfg["vocab_size"] * h
    tokens = n * (input_len + output_len)
    attn_per_seq = 0.0
    total = input_len + output_len
    attn_per_seq = 4 * L * heads * d * (total * total / 2)
    return 2 * body * tokens + 2 * cfg["vocab_size"] * h * n * output_len + n * attn_per_seq


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=HERE / "model_configs" / "llama-3.1-8b.json")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    ap.add_argument("--max-num-seqs", type=int, default=512,
                    help="graphs are captured up to this; 256 and 512 are both measured")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--skip", default="", help="comma-separated phases to skip")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    cfg = json.loads(args.config.read_text())
    summary: dict = {"commit": commit(), "gpu": torch.cuda.get_device_name(),
                     "model": args.config.stem, "torch": torch.__version__,
                     "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out_file = args.out / f"summary_{args.config.stem}.json"

    def save(key: str, value) -> None:
        summary[key] = value
        out_file.write_text(json.dumps(summary, indent=2))
        print(key, json.dumps(value), flush=True)

    if "ceilings" not in skip:
        c = ceilings()
        save("ceilings", c)
        summary["read_bw_GBps"] = c["read_bw_GBps"]
    path = model_dir(args.config)
    if "startup" not in skip:
        st = startup(path, 4096, 256)  # the engine defaults (graphs for batches up to 256)
        save("startup", st)
        summary["startup_s"] = st.get("startup_s")
    from soberana import LLM

    llm = LLM(str(path), load_format="dummy", max_model_len=4096,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    save("kv_pool", {"num_blocks": llm.engine.model_info.num_blocks,
                     "block_size": llm.engine.model_info.block_size})
    # Warm-up: Triton compiles each kernel variant on first use (prefill tiles for several
    # query lengths, decode split counts); keep that out of every timed workload.
    t = time.perf_counter()
    offline(llm, cfg, 300, 128, 8)
    offline(llm, cfg, 64, 1024, 4)
    save("warmup_s", time.perf_counter() - t)
    core = llm.engine
    if "bs1" not in skip:
        for mode in (True, False):  # async scheduling on, then off: same model, same run
            core.async_scheduling = mode
            d = decode_bs1(llm, cfg)
            if "read_bw_GBps" in summary:
                d["decode_bs1_bw_frac"] = d["achieved_GBps"] / summary["read_bw_GBps"]
            save("decode_bs1" if mode else "decode_bs1_sync", d)
        core.async_scheduling = True
        summary["decode_bs1_tok_s"] = summary["decode_bs1"]["decode_bs1_tok_s"]
        summary["decode_bs1_bw_frac"] = summary["decode_bs1"].get("decode_bs1_bw_frac")
    # 128/128: max_num_seqs 256 (the default) and 512, async scheduling on and off, each
    # config once untimed (its kernel variants compiled) and then twice, interleaved.
    configs = [(256, True), (256, False), (512, True), (512, False)]
    if "offline_128x128_sync" in skip:
        configs = [c for c in configs if c[1]]
    if "offline_128x128_seqs512" in skip:
        configs = [c for c in configs if c[0] != 512]
    if "offline_128x128" not in skip:
        for seqs, mode in configs:
            core.scheduler.max_num_seqs, core.async_scheduling = seqs, mode
            offline(llm, cfg, 1000, 128, 128)
        for rep in range(2):
            for seqs, mode in configs:
                core.scheduler.max_num_seqs, core.async_scheduling = seqs, mode
                r = offline(llm, cfg, 1000, 128, 128)
                name = f"offline_128x128_seqs{seqs}_{'async' if mode else 'sync'}_rep{rep}"
                save(name, dict(r, max_num_seqs=seqs, async_scheduling=mode))
        best = {c: max(summary[f"offline_128x128_seqs{c[0]}_{'async' if c[1] else 'sync'}"
                               f"_rep{k}"]["output_tok_s"] for k in range(2)) for c in configs}
        save("offline_128x128_best_of_2", {f"seqs{c[0]}_{'async' if c[1] else 'sync'}": v
                                           for c, v in best.items()})
        summary["offline_128x128_out_tok_s"] = best[(256, True)]  # the engine's defaults
    runs = {"offline_1024x128": (1000, 1024, 128), "offline_128x2048": (256, 128, 2048)}
    core.scheduler.max_num_seqs, core.async_scheduling = 256, True
    for name, (n, i, o) in runs.items():
        if name in skip:
            continue
        offline(llm, cfg, max(n // 4, 16), i, min(o, 256))  # compile this shape's variants
        r = offline(llm, cfg, n, i, o)
        save(name, dict(r, max_num_seqs=256, async_scheduling=True))
    out_file.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
