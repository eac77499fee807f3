"""Speculative decoding on one GPU, full-size architecture with random weights: speed-up as a
function of acceptance rate at batch 1, 8 and 64 (issue 25's mechanism cost and ceiling).

Random weights give no real drafter, so acceptance is driven:
- `oracle`: the drafts are the target's own greedy tokens (from the plain run of the same
  prompts), each replaced with probability `disagreement` by another id. Drafting is free,
  so the row measures verification alone: at disagreement 0 every draft is accepted (the
  ceiling for k), at 1 none is (the cost of verifying k wasted tokens). Forced on at every
  batch size (no turn-down), to draw the whole curve.
- `auto`: the same oracle at disagreement 0 and 1 with the engine's default turn-down
  (no drafting above `disable_by_batch_size` = 32 requests, per-request pause when acceptance
  is low): what a user gets, and the check that batch 64 is never slower than plain.
- `draft_model`: a second copy of the target as the drafter (`load_format="dummy"` fills the
  same fixed-seed weights, so every draft is accepted): the real draft-model path with its
  own KV pool, paying k target-sized draft forwards per step.
- `layer_skip`: the target's first quarter of layers drafts (random weights: acceptance is
  whatever it is; the row shows the drafter's cost).

Every speculative run is checked token for token against the plain run (greedy: lossless).
The peer is the same engine with speculation switched off (`engine.spec = None`), in the same
process: CUDA graphs and async scheduling as the plain engine serves.

    python benchmarks/gpu/spec_decode_gpu.py --config benchmarks/gpu/model_configs/llama-3.1-8b.json
    # logic check on a CPU with a tiny config:
    python benchmarks/gpu/spec_decode_gpu.py --config tiny.json --device cpu --batches 1,4 \
        --new-tokens 24 --methods oracle,auto,draft_model,layer_skip

Writes --out/summary.json after every run (a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # the repository's soberana, run from anywhere

from soberana import LLM, SamplingParams  # noqa: E402
from soberana.engine.spec_decode.config import SpeculativeConfig  # noqa: E402
from soberana.engine.spec_decode.manager import SpecDecode, build_proposer  # noqa: E402
from soberana.engine.spec_decode.proposer import Proposer  # noqa: E402


class OracleProposer(Proposer):
    """Drafts the target's greedy continuation of each prompt, every draft replaced with
    probability `disagreement` by a different id (seeded)."""

    def __init__(self, answers: dict[tuple[int, ...], list[int]], vocab: int,
                 disagreement: float, seed: int = 0) -> None:
        self.answers, self.vocab, self.disagreement = answers, vocab, disagreement
        self.rng = random.Random(seed)

    def propose(self, requests, num_drafts):
        out = []
        for r, k in zip(requests, num_drafts):
            n = len(r.output_token_ids)
            drafts = list(self.answers[tuple(r.prompt_token_ids)][n:n + k])
            for j, d in enumerate(drafts):
                if self.rng.random() < self.disagreement:
                    drafts[j] = (d + 1 + self.rng.randrange(self.vocab - 1)) % self.vocab
            out.append(drafts)
        return out


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=HERE, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("SOBERANA_COMMIT", "unknown")


def model_dir(config_path: Path) -> Path:
    """The architecture's config.json beside the demo tokenizer (ids are never decoded)."""
    from soberana.models.demo import demo_model_path

    out = Path(tempfile.mkdtemp(prefix="soberana-spec-"))
    (out / "config.json").write_text(config_path.read_text())
    for f in demo_model_path().glob("tokenizer*"):
        (out / f.name).write_bytes(f.read_bytes())
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_generate(llm: LLM, prompts: list[list[int]], params: SamplingParams,
                   device: str) -> tuple[list[list[int]], float]:
    sync(device)
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    sync(device)
    return [o.outputs[0].token_ids for o in outs], time.perf_counter() - t


def spec_run(llm: LLM, spec: SpecDecode, prompts, params, ref, t_plain, device,
             eager_verify: bool = False) -> dict:
    """One speculative run against the plain one's tokens and time; `eager_verify` runs the
    verification steps without their CUDA graphs."""
    engine = llm.engine
    graphs = engine.runner.verify_graphs
    replays = graphs.num_replays if graphs is not None else 0
    engine.spec = spec
    if eager_verify:
        engine.runner.verify_graphs = None
    try:
        tokens, seconds = timed_generate(llm, prompts, params, device)
    finally:
        engine.spec = None
        engine.runner.verify_graphs = graphs
    s = spec.stats
    n_out = sum(len(t) for t in tokens)
    return {"identical_to_plain": tokens == ref, "seconds": seconds,
            "output_tok_s": n_out / seconds, "speedup": t_plain / seconds,
            "acceptance_rate": s.acceptance_rate, "num_drafts": s.num_drafts,
            "num_draft_tokens": s.num_draft_tokens,
            "mean_accepted_per_draft_step": (s.num_accepted_tokens / s.num_drafts
                                             if s.num_drafts else 0.0),
            "accepted_per_pos": s.num_accepted_tokens_per_pos,
            "verify_graph_steps": (graphs.num_replays - replays
                                   if graphs is not None and not eager_verify else 0)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=HERE / "model_configs/llama-3.1-8b.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--disagreement", default="0,0.1,0.25,0.5,0.75,1")
    ap.add_argument("--methods", default="oracle,auto,draft_model,layer_skip")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--kv-cache-gb", type=float, default=6.0)
    ap.add_argument("--dtype", default="auto",
                    help="float32 for the identity check: bf16 verification (k+1 rows through "
                         "the prefill kernels) rounds differently from one-row decode, and "
                         "random weights give near-uniform logits whose argmax flips on that")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/spec_decode_gpu"))
    args = ap.parse_args()
    methods = args.methods.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    path = model_dir(args.config)
    cfg = json.loads(args.config.read_text())
    vocab = cfg["vocab_size"]
    max_len = args.prompt_len + args.new_tokens + args.k + 16
    # The engine is built with speculation on (the verification CUDA graphs are captured up
    # to the largest batch, so forced runs at batch 64 replay them too) and, when asked, the
    # draft model (the target's own weights: the dummy loader's seed is fixed); every
    # proposer is swapped in around it.
    base_spec = {"method": "ngram", "num_speculative_tokens": args.k,
                 "disable_by_batch_size": max(batches)}
    if "draft_model" in methods:
        base_spec.update(method="draft_model", model=str(path))
    t0 = time.perf_counter()
    llm = LLM(str(path), load_format="dummy", device=args.device, dtype=args.dtype,
              max_model_len=max_len,
              max_num_seqs=max(batches), kv_cache_gb=args.kv_cache_gb,
              enable_prefix_caching=False,  # every run computes its prompts again
              speculative_config=base_spec)
    engine = llm.engine
    draft_model_spec = engine.spec if "draft_model" in methods else None
    engine.spec = None
    summary = {"commit": commit(), "config": str(args.config), "device": args.device,
               "dtype": engine.model_info.dtype,
               "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
               "torch": torch.__version__, "k": args.k, "prompt_len": args.prompt_len,
               "new_tokens": args.new_tokens, "engine_start_s": time.perf_counter() - t0,
               "async_scheduling": engine.async_scheduling,
               "cuda_graphs": engine.runner.graphs is not None,
               "verify_graph_buckets": (engine.runner.verify_graphs.buckets
                                        if engine.runner.verify_graphs is not None else None),
               "runs": []}
    args.out.mkdir(parents=True, exist_ok=True)

    def record(row: dict) -> None:
        summary["runs"].append(row)
        print(json.dumps(row), flush=True)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    def spec_decode(method: str, proposer, **overrides) -> SpecDecode:
        conf = SpeculativeConfig(method=method, num_speculative_tokens=args.k, **overrides)
        return SpecDecode(conf, proposer, engine.model_info.max_model_len,
                          engine.structured.valid_drafts)

    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True,
                            detokenize=False)
    g = torch.Generator().manual_seed(0)
    warm = [torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist()]
    timed_generate(llm, warm, params.clone(max_tokens=8), args.device)
    forced = {"disable_by_batch_size": 1 << 20, "min_acceptance_rate": 0.0}
    for batch in batches:
        prompts = [torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist()
                   for _ in range(batch)]
        ref, t_plain = timed_generate(llm, prompts, params, args.device)
        n_out = sum(len(t) for t in ref)
        record({"batch": batch, "method": "plain", "seconds": t_plain,
                "output_tok_s": n_out / t_plain})
        answers = {tuple(p): t for p, t in zip(prompts, ref)}
        if "oracle" in methods:
            for eps in (float(e) for e in args.disagreement.split(",")):
                spec = spec_decode("ngram", OracleProposer(answers, vocab, eps), **forced)
                record({"batch": batch, "method": "oracle", "disagreement": eps,
                        **spec_run(llm, spec, prompts, params, ref, t_plain, args.device)})
                if eps == 0.0 and engine.runner.verify_graphs is not None:
                    spec = spec_decode("ngram", OracleProposer(answers, vocab, eps), **forced)
                    record({"batch": batch, "method": "oracle (verification eager)",
                            "disagreement": eps, **spec_run(llm, spec, prompts, params, ref,
                                                            t_plain, args.device, True)})
        if "auto" in methods:  # the engine's default turn-down rule
            for eps in (0.0, 1.0):
                spec = spec_decode("ngram", OracleProposer(answers, vocab, eps))
                record({"batch": batch, "method": "auto", "disagreement": eps,
                        **spec_run(llm, spec, prompts, params, ref, t_plain, args.device)})
        if draft_model_spec is not None:
            spec = spec_decode("draft_model", draft_model_spec.proposer, **forced)
            record({"batch": batch, "method": "draft_model (= target)",
                    **spec_run(llm, spec, prompts, params, ref, t_plain, args.device)})
        if "layer_skip" in methods:
            worker = engine.worker
            n = max(1, worker.model.config.num_layers // 4)
            conf = SpeculativeConfig(method="layer_skip", num_speculative_tokens=args.k,
                                     num_draft_layers=n)
            proposer = build_proposer(conf, worker.model, None,
                                      engine.model_info.num_blocks * engine.model_info.block_size,
                                      engine.model_info.block_size, worker.device,
                                      worker.kv_cache.dtype, vocab)
            spec = spec_decode("layer_skip", proposer, num_draft_layers=n, **forced)
            record({"batch": batch, "method": f"layer_skip ({n} layers)",
                    **spec_run(llm, spec, prompts, params, ref, t_plain, args.device)})
            del proposer, spec
    bad = [r for r in summary["runs"] if r.get("identical_to_plain") is False]
    print(f"done: {len(summary['runs'])} runs, {len(bad)} not identical to plain", flush=True)


if __name__ == "__main__":
    main()
