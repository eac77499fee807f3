"""Speculative decoding on this CPU, batch 1, real weights: acceptance and speed-up.

n-gram (prompt lookup) on input-grounded tasks (summarise / extract from / edit a given
document), self-speculation (layer_skip) on open chat, and n-gram on code editing with
Qwen2.5-Coder-1.5B-Instruct, each against the plain engine in the same run on the same
prompts; greedy, so the outputs must be identical (checked).

    PYTHONPATH=. python benchmarks/spec_decode_cpu.py [--cases grounded,chat,code]
        [--model DIR] [--code-model DIR] [--max-tokens N] [--draft-layers 8,15] [--out FILE]
Writes benchmarks/results/spec_decode_cpu.json (with /proc/cpuinfo model and flags, load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

DOCUMENT = """\
Meeting notes, 14 March. Attendees: Ana Ruiz (product), Tomas Berg (engineering), Li Wei
(support). Ana Ruiz opened with the release plan: version 2.4 ships on 2 April with the new
billing page, the export to CSV feature and the dark mode setting. Tomas Berg said the export
to CSV feature is finished but the billing page still needs a security review, which the
security team can start on 20 March. Li Wei reported that support received 143 tickets last
week, 61 of them about password resets, and asked for a self-service password reset page.
Ana Ruiz agreed to add the self-service password reset page to version 2.5. Action items:
Tomas Berg books the security review for the billing page; Li Wei sends the ticket report to
Ana Ruiz by Friday; Ana Ruiz updates the roadmap for version 2.5."""

GROUNDED = [
    f"Summarise the following meeting notes in three sentences.\n\n{DOCUMENT}",
    f"List every action item from these meeting notes, one per line, with the person "
    f"responsible.\n\n{DOCUMENT}",
    f"Rewrite these meeting notes, replacing the name Tomas Berg with Sam Lee and changing "
    f"nothing else.\n\n{DOCUMENT}",
]
CODE_SNIPPET = """\
def load_users(path):
    users = []
    with open(path) as f:
        for line in f:
            name, email, age = line.strip().split(",")
            if int(age) >= 18:
                users.append({"name": name, "email": email, "age": int(age)})
    return users


def find_user(users, email):
    for user in users:
        if user["email"] == email:
            return user
    return None
"""
CODE = [
    f"Rename the function load_users to read_adult_users everywhere in this code and change "
    f"nothing else. Reply with the full code.\n\n```python\n{CODE_SNIPPET}```",
    f"Add type hints to every function in this code. Reply with the full code.\n\n"
    f"```python\n{CODE_SNIPPET}```",
    f"Change find_user so that it compares emails case-insensitively. Reply with the full "
    f"code.\n\n```python\n{CODE_SNIPPET}```",
]
CHAT = [
    "What are three good habits for staying healthy?",
    "Explain what a CPU cache is to a beginner.",
    "Write a short story about a cat who learns to swim.",
]


def cpu_info() -> dict:
    info = {"machine": platform.machine(), "cores": os.cpu_count(), "loadavg": os.getloadavg()}
    try:
        for line in open("/proc/cpuinfo"):
            key = line.split(":")[0].strip()
            if key in ("model name", "flags") and key not in info:
                info[key] = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return info


def run(llm, prompts, max_tokens) -> tuple[list[list[int]], float, int]:
    from soberana import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    outs, seconds, tokens = [], 0.0, 0
    for p in prompts:  # batch 1: one conversation at a time
        t = time.perf_counter()
        o = llm.chat([{"role": "user", "content": p}], params)[0].outputs[0]
        seconds += time.perf_counter() - t
        outs.append(o.token_ids)
        tokens += len(o.token_ids)
    return outs, seconds, tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="grounded,chat",
                    help="comma-separated: grounded (ngram), chat (layer_skip), code (ngram)")
    ap.add_argument("--model", default="/work/models/hf/SmolLM2-135M-Instruct")
    ap.add_argument("--code-model", default="/work/models/hf/Qwen2.5-Coder-1.5B-Instruct")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--draft-layers", default="8",
                    help="layer_skip: comma-separated num_draft_layers to try")
    ap.add_argument("--out", default="benchmarks/results/spec_decode_cpu.json")
    args = ap.parse_args()
    from soberana import LLM

    # A small token budget keeps the CPU warm-up (one forward of a full budget) short.
    common = dict(device="cpu", max_model_len=1024, max_num_seqs=1, max_num_batched_tokens=512)
    ngram = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
             "prompt_lookup_max": 4}
    cases = []
    for name in args.cases.split(","):
        if name == "grounded":
            cases.append(("grounded", args.model, GROUNDED, ngram))
        elif name == "chat":
            cases += [("chat", args.model, CHAT, {"method": "layer_skip",
                                                  "num_speculative_tokens": 3,
                                                  "num_draft_layers": int(n)})
                      for n in args.draft_layers.split(",")]
        elif name == "code":
            cases.append(("code", args.code_model, CODE, ngram))
        else:
            raise SystemExit(f"--cases: unknown case {name!r}; allowed: grounded, chat, code")
    results = {"cpu": cpu_info(), "max_tokens": args.max_tokens, "runs": []}
    plains: dict[str, LLM] = {}
    for task, model, prompts, spec in cases:
        if model not in plains:
            plains.clear()  # one model's engines at a time: the 1.5B one is 6 GB in float32
            plains[model] = LLM(model, **common)
            run(plains[model], CHAT[:1], 8)  # warm
        plain = plains[model]
        llm = LLM(model, speculative_config=spec, **common)
        run(llm, CHAT[:1], 8)
        before = llm.engine.get_stats().spec_decoding
        ref, t_plain, n_plain = run(plain, prompts, args.max_tokens)
        out, t_spec, n_spec = run(llm, prompts, args.max_tokens)
        s = llm.engine.get_stats().spec_decoding
        drafted = s.num_draft_tokens - before.num_draft_tokens
        accepted = s.num_accepted_tokens - before.num_accepted_tokens
        steps = s.num_drafts - before.num_drafts
        row = {
            "task": task, "model": model, "dtype": llm.engine.model_info.dtype,
            "speculative_config": spec, "identical_to_plain": out == ref,
            "plain_tok_s": n_plain / t_plain, "spec_tok_s": n_spec / t_spec,
            "speedup": (n_spec / t_spec) / (n_plain / t_plain),
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "mean_accepted_per_draft_step": accepted / steps if steps else 0.0,
            "draft_steps": steps, "draft_tokens": drafted, "output_tokens": n_spec,
            "loadavg": os.getloadavg(),
        }
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
        del llm
    results["cpu"]["loadavg_end"] = os.getloadavg()
    results["commit"] = os.popen("git rev-parse --short HEAD").read().strip()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
