"""SmolLM2-135M-Instruct on CPU: soberana vs llama.cpp vs transformers, same run, interleaved.

The three workloads of issue 19, at one precision and one instruction-set level per run:
  - decode: batch-1 decode tok/s at a 128-token context (llama-bench `-p 0 -n 64 -d 128`;
    ours: a 128-token prompt, 65 tokens out, (65 - 1) / (finished - first token));
  - batched: 64 sequences x 128 prompt / 64 output tokens, total (prompt + output) tok/s over
    the whole run (llama-batched-bench `-npp 128 -ntg 64 -npl 64`, its "S t/s"; ours: one
    `LLM.generate` of the 64 prompts, ignore_eos; transformers: one padded `generate`);
  - pp4096: prefill of a 4,096-token prompt, tok/s (llama-bench `-p 4096 -n 0`; ours:
    `LLM.generate` with max_tokens=1; transformers: one forward).
Precisions: f32 (ours float32), bf16 (ours bfloat16), q8_0 (ours `--quantization int8`: W8A8
with int8 activations per block of 32 as Q8_0's, but one weight scale per output channel
where Q8_0 has one per block of 32 weights; the output head int8 too, as Q8_0's, which the
peer `soberana-lm_head-off` leaves in the model dtype), f16 (llama.cpp only).
ISA: native (this CPU's: AVX-512 here) or avx2 — llama.cpp's AVX2-only build
(benchmarks/llamacpp_build.sh avx2), our `cpu_isa="avx2"` kernels, and for every peer's
PyTorch parts ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2 (how an AVX-512 host runs
the path of a CPU without AVX-512; it is not a Zen 3).
Threads: `--threads` for every peer (llama.cpp -t, OMP_NUM_THREADS for the PyTorch peers and
our kernels, which follow torch's thread count). On a shared, oversubscribed host llama.cpp at
-t 2 collapses (its threads sync at every op and spin while a partner is descheduled: 1.6 vs 32
tok/s at -t 1, load 13 on 2 cores), so such hosts compare at --threads 1.
Each peer runs in its own process, one after the other, `--rounds` times in alternation; the
report keeps every sample and the median per peer. Take the bench lock:

    flock /work/notes/bench.lock python benchmarks/cpu_llamacpp_peers.py --precision bf16 \
        --isa native --output benchmarks/results/cpu_llamacpp_peers_bf16_native_zen4.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_throughput import _cpuinfo, commit  # noqa: E402


def cpu_flags() -> list[str]:
    """The vector-ISA flags of /proc/cpuinfo (what decides which kernels can run)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return [f for f in line.split(":", 1)[1].split()
                    if f.startswith(("avx", "amx", "fma", "f16c", "sse4", "bmi", "vnni"))]
    return []

LLAMACPP = Path(os.environ.get("LLAMACPP_CACHE", Path.home() / ".cache/soberana/llamacpp"))
MODEL = Path("/work/models/hf/SmolLM2-135M-Instruct")
OURS = {"f32": {"dtype": "float32"}, "bf16": {"dtype": "bfloat16"},
        "q8_0": {"dtype": "bfloat16", "quantization": "int8"}}  # fmt: skip
HF = {"f32": "float32", "bf16": "bfloat16"}
WORKLOADS = ("decode", "batched", "pp4096")
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}

# Our engine and transformers run this in a child process: argv = peer, model, precision
# kwargs (JSON), workloads (comma list), isa. Prints one RESULT line of JSON.
CHILD = r"""
import json, os, sys, time, random
import torch
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
peer, model, kw, workloads, isa = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4].split(","), sys.argv[5]
rng = random.Random(0)
def prompt(n):  # random ids below the specials' range: no prefix shared across prompts
    return [rng.randrange(1000, 40000) for _ in range(n)]
out = {}
if peer == "soberana":
    from soberana import LLM, SamplingParams
    t0 = time.perf_counter()
    llm = LLM(model, max_model_len=4096 + 64, max_num_seqs=64, cpu_isa=isa, **kw)
    out["load_s"] = time.perf_counter() - t0
    def gen(prompts, n):
        sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)
        return llm.generate(prompts, sp, use_tqdm=False)
    gen([prompt(128)], 8)  # warm-up
    if "decode" in workloads:
        rates = []
        for _ in range(3):
            o = gen([prompt(128)], 65)[0]
            m = o.metrics
            rates.append((len(o.outputs[0].token_ids) - 1) / (m["finished_time"] - m["first_token_time"]))
        out["decode"] = {"tok_s": sorted(rates)[1], "samples": rates}
    if "batched" in workloads:
        ps = [prompt(128) for _ in range(64)]
        t = time.perf_counter()
        outs = gen(ps, 64)
        dt = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == 64 for o in outs)
        out["batched"] = {"tok_s": 64 * (128 + 64) / dt, "seconds": dt}
    if "pp4096" in workloads:
        rates = []
        for _ in range(2):
            t = time.perf_counter()
            gen([prompt(4096)], 1)
            rates.append(4096 / (time.perf_counter() - t))
        out["pp4096"] = {"tok_s": max(rates), "samples": rates}
else:
    import transformers
    t0 = time.perf_counter()
    m = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, kw["dtype"])).eval()
    out["load_s"] = time.perf_counter() - t0
    cfg = lambda n: transformers.GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    def gen(ids, n):
        with torch.no_grad():
            return m.generate(torch.tensor(ids), attention_mask=torch.ones(len(ids), len(ids[0]), dtype=torch.long), generation_config=cfg(n))
    gen([prompt(128)], 4)
    if "decode" in workloads:
        rates = []
        for _ in range(3):
            p = [prompt(128)]
            t = time.perf_counter(); gen(p, 1); t1 = time.perf_counter() - t
            t = time.perf_counter(); gen(p, 65); t65 = time.perf_counter() - t
            rates.append(64 / (t65 - t1))
        out["decode"] = {"tok_s": sorted(rates)[1], "samples": rates}
    if "batched" in workloads:
        t = time.perf_counter()
        o = gen([prompt(128) for _ in range(64)], 64)
        dt = time.perf_counter() - t
        assert o.shape == (64, 192)
        out["batched"] = {"tok_s": 64 * (128 + 64) / dt, "seconds": dt}
    if "pp4096" in workloads:
        rates = []
        for _ in range(2):
            ids = torch.tensor([prompt(4096)])
            t = time.perf_counter()
            with torch.no_grad():
                m(ids, logits_to_keep=1)
            rates.append(4096 / (time.perf_counter() - t))
        out["pp4096"] = {"tok_s": max(rates), "samples": rates}
print("RESULT " + json.dumps(out))
"""


def _run(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env},
                          timeout=timeout)  # fmt: skip


def python_peer(peer: str, kwargs: dict, workloads: list[str], isa: str, env: dict) -> dict:
    t = time.perf_counter()
    proc = _run([sys.executable, "-c", CHILD, peer, str(MODEL), json.dumps(kwargs),
                 ",".join(workloads), isa], env, timeout=900)  # fmt: skip
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return {"error": (proc.stderr or proc.stdout)[-1500:]}
    return {**json.loads(line[7:]), "process_s": time.perf_counter() - t,
            "loadavg_end": os.getloadavg()[0]}  # fmt: skip


def llamacpp_peer(precision: str, workloads: list[str], isa: str, env: dict,
                  threads: int) -> dict:
    bin_dir = LLAMACPP / f"build-{isa}" / "bin"
    gguf = LLAMACPP / "gguf" / f"{MODEL.name}-{precision}.gguf"
    out: dict = {"gguf": str(gguf)}
    bench = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-o", "json"]
    if "decode" in workloads:
        proc = _run(bench + ["-p", "0", "-n", "64", "-d", "128", "-r", "3"], env, 600)
        row = json.loads(proc.stdout)[0]
        out["decode"] = {"tok_s": statistics.median(row["samples_ts"]),
                         "samples": row["samples_ts"], "flash_attn": row["flash_attn"],
                         "build_commit": row["build_commit"]}  # fmt: skip
    if "batched" in workloads:
        proc = _run([str(bin_dir / "llama-batched-bench"), "-m", str(gguf), "-t", str(threads),
                     "-c", str(64 * 192), "-npp", "128", "-ntg", "64", "-npl", "64",
                     "--output-format", "jsonl"], env, 900)  # fmt: skip
        row = json.loads([x for x in proc.stdout.splitlines() if x.startswith("{")][-1])
        out["batched"] = {"tok_s": row["speed"], "seconds": row["t"], "pp_tok_s": row["speed_pp"],
                          "tg_tok_s": row["speed_tg"]}  # fmt: skip
    if "pp4096" in workloads:
        proc = _run(bench + ["-p", "4096", "-n", "0", "-r", "2"], env, 900)
        row = json.loads(proc.stdout)[0]
        out["pp4096"] = {"tok_s": max(row["samples_ts"]), "samples": row["samples_ts"]}
    out["loadavg_end"] = os.getloadavg()[0]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", choices=["f32", "f16", "bf16", "q8_0"], required=True)
    ap.add_argument("--isa", choices=["native", "avx2"], default="native")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--peers", default="llamacpp,soberana,transformers")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()
    workloads = args.workloads.split(",")
    env = {**(AVX2_ENV if args.isa == "avx2" else {}), "OMP_NUM_THREADS": str(args.threads)}
    report = {"benchmark": "cpu_llamacpp_peers", "commit": commit(), "model": MODEL.name,
              "precision": args.precision, "isa": args.isa, "threads": args.threads, "env": env,
              "cpu": {**_cpuinfo(), "flags": cpu_flags()},
              "cores": os.cpu_count(), "loadavg_start": os.getloadavg(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "rounds": []}  # fmt: skip
    for _ in range(args.rounds):
        row = {}
        for peer in args.peers.split(","):
            if peer == "llamacpp":
                row[peer] = llamacpp_peer(args.precision, workloads, args.isa, env,
                                          args.threads)
            elif peer in ("soberana", "soberana-lm_head-off") and args.precision in OURS:
                kwargs = dict(OURS[args.precision])  # bfloat16 at either ISA: the decoder
                # stack (one native call a step) serves only bfloat16; the AVX2 kernels widen
                # it in registers, and the W8A8 kernel reads it as it reads float32
                if peer == "soberana-lm_head-off":  # q8_0: the output head left unquantized
                    kwargs["lm_head_quantized"] = False
                row[peer] = python_peer("soberana", kwargs, workloads, args.isa, env)
            elif peer == "transformers" and args.precision in HF:
                row[peer] = python_peer(peer, {"dtype": HF[args.precision]}, workloads,
                                        args.isa, env)  # fmt: skip
            print(peer, json.dumps(row.get(peer)), flush=True)
        report["rounds"].append(row)
    summary = {}
    for w in workloads:
        med = {p: statistics.median(r[p][w]["tok_s"] for r in report["rounds"] if w in r.get(p, {}))
               for p in report["rounds"][0] if all(w in r.get(p, {}) for r in report["rounds"])}
        if "llamacpp" in med:
            med.update({f"{p}_vs_llamacpp": v / med["llamacpp"] for p, v in list(med.items())
                        if p != "llamacpp"})  # fmt: skip
        summary[w] = med
    report["summary_tok_s"] = summary
    report["loadavg_end"] = os.getloadavg()
    print(json.dumps(summary, indent=1))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
