"""Where a batched decode step's device time goes, per scheme, on the Llama-3.1-8B shape with
random weights: `--batch` sequences decoding at ~`--context` tokens, a few engine steps under
torch.profiler; the top CUDA kernels by total device time with their launch counts, and the
step's median wall time. Issue 20: fp8 W8A8 offline 128/128 was slower than bf16 on an H100
(17.4 vs 14.2 ms steps at ~488 sequences) and int8 0.42x bf16; this names the kernels.
One engine per scheme in turn, in this process; writes --out/profile_offline.{json,txt}
after each scheme. About 90 s on an H100 for the three.

    python benchmarks/gpu/profile_offline.py --out $OUT
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from engine_h200 import commit, model_dir  # noqa: E402


def top_kernels(events, top: int) -> list[dict]:
    """CUDA kernels (device events) grouped by name, largest total device time first; on a
    machine without CUDA (a smoke run) the CPU ops by self time instead."""
    cuda = torch.cuda.is_available()
    total_us, count = defaultdict(float), defaultdict(int)
    for e in events:
        if cuda and e.device_type == DeviceType.CUDA:
            total_us[e.name] += e.device_time_total
        elif not cuda and e.device_type == DeviceType.CPU:
            total_us[e.name] += e.self_cpu_time_total
        else:
            continue
        count[e.name] += 1
    device_us = sum(total_us.values()) or 1.0
    ranked = sorted(total_us, key=total_us.get, reverse=True)[:top]
    return [{"kernel": name, "total_ms": total_us[name] / 1e3, "count": count[name],
             "share": total_us[name] / device_us} for name in ranked]  # fmt: skip


def decoding_batch(llm, batch: int, context: int, vocab: int, max_tokens: int) -> None:
    """Admit `batch` requests of `context` random tokens and step until all are decoding."""
    from soberana import SamplingParams
    from soberana.engine.outputs import EngineCoreRequest

    core = llm.engine
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                            detokenize=False)  # fmt: skip
    g = torch.Generator().manual_seed(batch * 7 + context)
    for i in range(batch):
        prompt = torch.randint(0, vocab, (context,), generator=g).tolist()
        core.add_request(EngineCoreRequest(f"p{i}", prompt, params, time.time()))
    sched = core.scheduler
    while sched.waiting or any(r.num_computed_tokens < len(r.prompt_token_ids)
                               for r in sched.running):  # fmt: skip
        core.step()


def profile_scheme(args, cfg: dict, path: Path, scheme: str) -> dict:
    from soberana import LLM

    t0 = time.time()
    llm = LLM(str(path), load_format="dummy", max_model_len=args.context + 256,
              quantization=None if scheme == "none" else scheme, max_num_seqs=args.batch,
              max_num_batched_tokens=args.max_num_batched_tokens,
              gpu_memory_utilization=0.85, enforce_eager=args.enforce_eager)  # fmt: skip
    res = {"load_s": time.time() - t0, "kernels": llm.engine.model_info.quantization_kernels}
    core = llm.engine
    # the first prompts decode while the last prefill: none may finish before the profile ends
    decoding_batch(llm, args.batch, args.context, cfg["vocab_size"], max_tokens=200)
    for _ in range(args.warmup):
        core.step()
    times = []
    for _ in range(args.timed):
        t = time.perf_counter()
        core.step()  # ends with the sampled ids on the host: a full sync
        times.append(time.perf_counter() - t)
    res.update(running=len(core.scheduler.running), step_ms_p50=1e3 * statistics.median(times),
               step_ms_min=1e3 * min(times))  # fmt: skip
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.profiled):
            core.step()
        if cuda:
            torch.cuda.synchronize()
    res["profiled_steps"] = args.profiled
    res["top_kernels"] = top_kernels(prof.events(), args.top)
    del llm, core, prof
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return res


def table(scheme: str, res: dict) -> str:
    lines = [f"==== {scheme}: {res['running']} sequences decoding, step p50 "
             f"{res['step_ms_p50']:.2f} ms (min {res['step_ms_min']:.2f}); "
             f"{res['profiled_steps']} steps profiled; kernels: {res['kernels']}"]
    for k in res["top_kernels"]:
        lines.append(f"{k['total_ms']:9.2f} ms {k['count']:6d}x {100 * k['share']:5.1f}%  "
                     f"{k['kernel'][:110]}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=HERE / "model_configs" / "llama-3.1-8b.json")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    ap.add_argument("--schemes", default="none,fp8,int8")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--timed", type=int, default=10)
    ap.add_argument("--profiled", type=int, default=5)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--enforce-eager", action="store_true",
                    help="no CUDA graphs (if the profiler shows no kernels inside replays)")
    args = ap.parse_args()
    cfg = json.loads(args.config.read_text())
    path = model_dir(args.config)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU smoke run)"
    summary = {"commit": commit(), "gpu": gpu, "torch": torch.__version__,
               "config": args.config.name, "args": {k: str(v) for k, v in vars(args).items()},
               "results": {}}  # fmt: skip
    texts = []
    for scheme in args.schemes.split(","):
        try:
            res = profile_scheme(args, cfg, path, scheme)
        except Exception as exc:  # a scheme this GPU refuses: record why, go on
            res = {"error": f"{type(exc).__name__}: {exc}"}
        summary["results"][scheme] = res
        texts.append(table(scheme, res) if "error" not in res else f"==== {scheme}: {res}")
        print(texts[-1], flush=True)
        (args.out / "profile_offline.json").write_text(json.dumps(summary, indent=1))
        (args.out / "profile_offline.txt").write_text("\n\n".join(texts) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
