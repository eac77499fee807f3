"""Where the per-token cost of structured outputs goes, over real schema-constrained generations
in the engine (offline `LLM`, in-process), with a tokenizer's real vocabulary.

Definitions (every number is per step of one constrained request unless it says "batch"):
- **per-token mask time**: computing one request's next-token bitmask at one step (llguidance's
  mask for the matcher's state after the tokens the model really sampled). Measured by
  replaying each generated answer through a fresh matcher, one mask at a time, so that it is
  one request's cost and not a batch's divided by its size: the thread's CPU time (what the
  mask costs when the thread is not preempted) and wall time.
- in the engine, per step of the batch (hooks around the engine's own functions):
  `fill`: the host thread's batched fill (allocation + matcher look-ups + llguidance's
  parallel fill), wall; on a CPU, the masks of the rows the sampled-token check refused
  (LazyTokenMask._words); `check`: that check of the sampled tokens (CPU), with the rows it
  kept and refused; `wait`: how long the engine loop blocked for the mask after computing
  the logits (what the overlap did not hide); `apply`: putting the bitmask on the logits;
  `accept`: feeding the sampled tokens back to the matchers; `step`: the whole engine step.

Then the same requests unconstrained (same prompts, seeds, `ignore_eos` and the constrained
run's answer lengths as `min_tokens`/`max_tokens`) against the constrained ones, in rounds of
one pair whose order alternates (ABBA): wall time and the process's CPU time of each, and the
load average. On a CPU the engine computes the mask in its loop (soberana/structured/manager.py).
`--threads N` sets torch's threads (1: the process's CPU seconds are the work done, with no
OpenMP spin-waiting, so the CPU-time ratio holds on a loaded host).

`--retokenize DIR` also replays the same answers' text tokenized by another (larger)
vocabulary, e.g. Qwen2.5's 151k, whose grammar masks cost more inside strings.

    python benchmarks/structured_mask.py --model demo|DIR --out PATH [--requests 120]
        [--max-tokens 96] [--rounds 3] [--retokenize DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.schemas.real_world import schemas  # noqa: E402
from benchmarks.structured_compile import cpu_flags, cpu_model, summary  # noqa: E402


class Timings:
    """Lists of seconds per hook, filled by wrappers around the engine's functions, and the
    engine thread's CPU seconds in the grammar's hooks (fill, apply, accept) in all: the work
    structured outputs add, which a loaded host's preemption does not inflate."""

    def __init__(self) -> None:
        self.grammar_cpu_s = 0.0
        self.fill: list[float] = []
        self.fill_rows: list[int] = []
        self.check: list[float] = []
        self.check_rows = 0
        self.refused_rows = 0
        self.wait: list[float] = []
        self.apply: list[float] = []
        self.accept: list[float] = []
        self.step: list[float] = []

    def report(self) -> dict:
        out = {name: summary(values) for name in ("fill", "check", "wait", "apply", "accept",
                                                  "step") if (values := getattr(self, name))}
        if self.check_rows:
            out["check_rows"], out["refused_rows"] = self.check_rows, self.refused_rows
        if self.fill_rows:
            out["fill_rows_mean"] = statistics.fmean(self.fill_rows)
            out["fill_per_row_us_mean"] = 1e6 * sum(self.fill) / sum(self.fill_rows)
        return out


def timed(fn, into: list[float], timings: Timings | None = None):
    """`fn` appending its wall seconds to `into` (and its thread CPU seconds to
    `timings.grammar_cpu_s` when given)."""
    def wrapper(*args, **kwargs):
        t, c = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - t)
            if timings is not None:
                timings.grammar_cpu_s += time.thread_time() - c
    return wrapper


class _TimedFuture:
    def __init__(self, future, into: list[float]) -> None:
        self.future, self.into = future, into

    def result(self, timeout=None):
        t = time.perf_counter()
        value = self.future.result(timeout)
        self.into.append(time.perf_counter() - t)
        return value


def instrument(llm, timings: Timings) -> None:
    """Wrap the engine's structured-output functions (this process only) to time them."""
    from soberana.structured.manager import LazyTokenMask, TokenMask

    engine, manager = llm.engine, llm.engine.structured

    def timed_fill(fill, rows_of):
        def wrapper(*args):
            t, c = time.perf_counter(), time.thread_time()
            try:
                return fill(*args)
            finally:
                timings.fill.append(time.perf_counter() - t)
                timings.grammar_cpu_s += time.thread_time() - c
                timings.fill_rows.append(rows_of(*args))
        return wrapper

    manager._fill = timed_fill(manager._fill, lambda batch, rows: len(rows))  # accelerator
    LazyTokenMask._words = timed_fill(  # CPU: the refused rows' llguidance masks
        LazyTokenMask._words, lambda m, rows: len(rows))
    refused = timed(LazyTokenMask.refused, timings.check, timings)

    def refused_counted(mask, tokens):
        rows = refused(mask, tokens)
        timings.check_rows += len(mask.matchers)
        timings.refused_rows += len(rows)
        return rows

    LazyTokenMask.refused = refused_counted
    start = manager.start_masks

    def start_timed(requests):
        future = start(requests)
        return None if future is None else _TimedFuture(future, timings.wait)

    manager.start_masks = start_timed
    TokenMask.apply_ = timed(TokenMask.apply_, timings.apply, timings)
    manager.accept = timed(manager.accept, timings.accept, timings)
    engine.step = timed(engine.step, timings.step)


def requests(tokenizer, n: int, max_tokens: int, constrained: bool, lengths=None):
    """(prompt ids, SamplingParams) for n requests cycling over the 120 schemas."""
    from soberana.engine.sampling_params import SamplingParams
    from soberana.structured.params import StructuredOutputsParams

    items = schemas()
    out = []
    for i in range(n):
        name, schema = items[i % len(items)]
        text = f"Write one JSON object for a {name.rsplit('_', 1)[0]} record. Answer with JSON only."
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                tokenize=True, add_generation_prompt=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        else:
            ids = tokenizer.encode(text)
        if constrained:
            params = SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens,
                                    structured_outputs=StructuredOutputsParams(json=schema))
        else:  # the constrained answer's length exactly, whatever the model picks
            params = SamplingParams(temperature=1.0, seed=i, max_tokens=lengths[i],
                                    min_tokens=lengths[i], ignore_eos=True)
        out.append((ids, params))
    return out


def generate(llm, reqs) -> tuple[list, float, float]:
    """Outputs, wall seconds and the process's CPU seconds (all threads)."""
    t, c = time.perf_counter(), time.process_time()
    outs = llm.generate([ids for ids, _ in reqs], [p for _, p in reqs], use_tqdm=False)
    return outs, time.perf_counter() - t, time.process_time() - c


def replay(compiler, vocab: int, answers) -> dict:
    """Per-request per-step mask time: each (constraint, answer token ids) through a fresh
    matcher of the compiler's grammar, one mask at a time."""
    import torch
    from llguidance.torch import fill_next_token_bitmask

    bitmask = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)
    cpu, wall, allowed_frac, refused = [], [], [], 0
    for spec, tokens in answers:
        matcher = compiler.compile(spec)
        for token in tokens:
            t, c = time.perf_counter(), time.thread_time()
            fill_next_token_bitmask(matcher, bitmask, 0)
            cpu.append(time.thread_time() - c)
            wall.append(time.perf_counter() - t)
            allowed_frac.append(_popcount(bitmask) / vocab)
            if not matcher.consume_token(token):
                refused += 1
                break
            if matcher.is_stopped():
                break
    return {"vocab": vocab, "mask_thread_cpu": summary(cpu), "mask_wall": summary(wall),
            "refused": refused, "allowed_fraction_mean": statistics.fmean(allowed_frac)}


def replay_retokenized(path: str, reqs, outs) -> dict:
    """The same answers' text, tokenized by another (larger) vocabulary, replayed there."""
    from soberana.models.tokenizer import load_tokenizer
    from soberana.structured.compiler import GrammarCompiler, build_ll_tokenizer

    tok = load_tokenizer(path)
    vocab = len(tok)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    compiler = GrammarCompiler(build_ll_tokenizer(tok, vocab, eos), timeout_s=60)
    answers = [(p.structured_outputs, tok.encode(o.outputs[0].text, add_special_tokens=False))
               for (_, p), o in zip(reqs, outs)]
    replay(compiler, vocab, answers)  # first pass: the grammars' lazily built lexer states
    return {"tokenizer": path, **replay(compiler, vocab, answers)}


def _popcount(bitmask) -> int:
    import numpy as np

    return int(np.unpackbits(bitmask.numpy().view(np.uint8)).sum())


def valid_json(outs) -> int:
    ok = 0
    for out in outs:
        try:
            json.loads(out.outputs[0].text)
            ok += 1
        except ValueError:
            pass
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    ap.add_argument("--skip-replay", action="store_true",
                    help="only the A/B rounds and the in-engine timings")
    ap.add_argument("--retokenize", help="also replay the answers tokenized by this tokenizer")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch

    from soberana.engine.llm import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    llm = LLM(args.model, max_num_seqs=args.max_num_seqs, max_model_len=512)
    tok = llm.tokenizer
    constrained = requests(tok, args.requests, args.max_tokens, True)
    generate(llm, constrained[:8])  # tokenizer for grammars, first steps, compiles
    generate(llm, requests(tok, 8, 8, False, [8] * 8))
    outs, _, _ = generate(llm, constrained)  # compiles every schema once
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    free = requests(tok, args.requests, args.max_tokens, False, lengths)
    rounds = []
    for i in range(args.rounds):  # ABBA: a drifting load hits both kinds alike
        run = {}
        for name in (("unconstrained", "json_schema") if i % 2 == 0
                     else ("json_schema", "unconstrained")):
            _, wall, cpu = generate(llm, free if name == "unconstrained" else constrained)
            run[name] = {"wall_s": wall, "cpu_s": cpu,
                         "loadavg": Path("/proc/loadavg").read_text().split()[0]}
        base, json_ = run["unconstrained"], run["json_schema"]
        json_["wall_slowdown_pct"] = 100 * (json_["wall_s"] / base["wall_s"] - 1)
        json_["cpu_increase_pct"] = 100 * (json_["cpu_s"] / base["cpu_s"] - 1)
        print(json.dumps(run))
        rounds.append(run)
    timings = Timings()  # hooks last: they cost a little themselves
    instrument(llm, timings)
    outs, _, _ = generate(llm, constrained)
    in_engine = timings.report()
    if rounds:  # the grammar's CPU seconds against an unconstrained run's (median)
        free_cpu = statistics.median(r["unconstrained"]["cpu_s"] for r in rounds)
        in_engine["grammar_cpu_s"] = timings.grammar_cpu_s
        in_engine["grammar_cpu_pct_of_unconstrained_cpu"] = 100 * timings.grammar_cpu_s / free_cpu
    manager = llm.engine.structured
    per_token = None if args.skip_replay else replay(manager.compiler, manager.vocab_size, [
        (p.structured_outputs, list(o.outputs[0].token_ids)) for (_, p), o in zip(constrained, outs)])
    if args.retokenize:
        per_token = {"model_tokenizer": per_token,
                     "retokenized": replay_retokenized(args.retokenize, constrained, outs)}
    result = {
        "model": args.model, "vocab": llm.engine.structured.vocab_size, "cpu": cpu_model(),
        "cpu_flags": cpu_flags(), "torch_threads": torch.get_num_threads(),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip(),
        "requests": args.requests, "max_num_seqs": args.max_num_seqs,
        "max_tokens": args.max_tokens, "completion_tokens": sum(lengths),
        "steps_per_round": len(timings.step),
        "valid_json": valid_json(outs), "loadavg_start": load_start,
        "per_token_mask": per_token, "in_engine_per_step": in_engine,
        "ab_rounds": rounds, "ab_median": {
            name: {key: statistics.median(r[name][key] for r in rounds)
                   for key in ("wall_slowdown_pct", "cpu_increase_pct")}
            for name in ("json_schema",)} if rounds else None,
        # the fastest run of each kind, the one least held up by other load on a shared host
        "ab_best_wall_slowdown_pct": 100 * (
            min(r["json_schema"]["wall_s"] for r in rounds)
            / min(r["unconstrained"]["wall_s"] for r in rounds) - 1) if rounds else None,
        "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
    }
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
