"""Diagnosis: do async and sync scheduling give identical sampled ids on the GPU, and if not,
do the steps' batch compositions differ? Prints one JSON line per check."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from soberana import LLM, SamplingParams  # noqa: E402
from tests.engine.tiny_models import prompts_of_lengths  # noqa: E402

VOCAB = 4096


def build(out: Path) -> Path:
    import transformers

    from soberana.models.loader import resolve_model_path

    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
        num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096,
        initializer_range=0.05)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    for f in resolve_model_path("demo").glob("tokenizer*"):
        (out / f.name).write_bytes(f.read_bytes())
    return out


def run(llm, prompts, params, mode: bool):
    core = llm.engine
    core.async_scheduling = mode
    steps = []
    schedule = core.scheduler.schedule

    def logged():
        s = schedule()
        steps.append([(x.request.request_id, x.num_new_tokens) for x in s.scheduled])
        return s

    core.scheduler.schedule = logged
    outs = llm.generate(prompts, params)
    core.scheduler.schedule = schedule
    base = int(outs[0].request_id)
    steps = [[(int(r) - base, n) for r, n in st] for st in steps]
    return [o.outputs[0].token_ids for o in outs], [o.outputs[0].finish_reason for o in outs], steps


def main() -> int:
    import tempfile

    path = build(Path(tempfile.mkdtemp()))
    prompts = prompts_of_lengths([5, 40, 300, 1200], seed=9, vocab=VOCAB)
    sampled = dict(temperature=0.9, top_p=0.8, top_k=50, min_p=0.05, seed=5, max_tokens=24,
                   min_tokens=4, logprobs=2, detokenize=False)
    for dtype in ("bfloat16", "float32"):
        llm = LLM(str(path), max_model_len=4096, kv_cache_gb=4, max_num_batched_tokens=512,
                  dtype=dtype)
        for name, kw in (("sampled", sampled),
                         ("sampled_ignore_eos", dict(sampled, ignore_eos=True)),
                         ("greedy", dict(temperature=0, max_tokens=24, detokenize=False))):
            p = SamplingParams(**kw)
            a1, fa, sa = run(llm, prompts, p, True)
            b1, fb, sb = run(llm, prompts, p, False)
            b2, _, sb2 = run(llm, prompts, p, False)
            a2, _, _ = run(llm, prompts, p, True)
            first = [next((i for i, (x, y) in enumerate(zip(u, v)) if x != y), None)
                     for u, v in zip(a1, b1)]
            print(json.dumps({"dtype": dtype, "case": name, "async_eq_sync": a1 == b1,
                              "sync_eq_sync": b1 == b2, "async_eq_async": a1 == a2,
                              "steps_equal": sa == sb, "sync_steps_equal": sb == sb2,
                              "first_diff": first, "finish_async": fa, "finish_sync": fb,
                              "steps_async": sa[:12] if sa != sb else None,
                              "steps_sync": sb[:12] if sa != sb else None}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
