"""The transformers peer on the same GPU and architecture (random bf16 weights), same run as
engine_h200.py: batch-1 greedy decode with a static cache + torch.compile, and
`generate_batch` (continuous batching) on N random prompts of 128 in / 128 out.

    python benchmarks/gpu/hf_reference.py --config benchmarks/gpu/model_configs/llama-3.1-8b.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def build(config_path: Path):
    import transformers

    cfg = transformers.AutoConfig.for_model(**json.loads(config_path.read_text()))
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.eval(), cfg


def decode_bs1(model, cfg, new_tokens: int = 256) -> dict:
    from transformers import GenerationConfig

    ids = torch.randint(0, cfg.vocab_size, (1, 128), device="cuda")
    # A static cache makes generate() compile its decoding step (torch.compile, CUDA graphs).
    gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                           pad_token_id=0, cache_implementation="static")
    t0 = time.perf_counter()
    for _ in range(2):  # compile and capture
        model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
    compile_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    n = out.shape[1] - ids.shape[1]
    return {"hf_bs1_tok_s": n / dt, "new_tokens": n, "seconds": dt, "compile_s": compile_s}


def generate_batch(model, cfg, n: int, input_len: int, output_len: int) -> dict:
    from transformers import GenerationConfig

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (input_len,), generator=g).tolist()
               for _ in range(n)]
    gen = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    model.generate_batch(prompts[:8], generation_config=gen)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = model.generate_batch(prompts, generation_config=gen)
    dt = time.perf_counter() - t0
    tokens = sum(len(o.generated_tokens) for o in outs.values())
    return {"hf_generate_batch_out_tok_s": tokens / dt, "output_tokens": tokens, "seconds": dt,
            "num_prompts": n}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=HERE / "model_configs" / "llama-3.1-8b.json")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--skip", default="")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    import transformers

    result = {"model": args.config.stem, "gpu": torch.cuda.get_device_name(),
              "transformers": transformers.__version__, "torch": torch.__version__}
    out = args.out / f"hf_reference_{args.config.stem}.json"
    model, cfg = build(args.config)
    if "batch" not in skip:  # before compile: generate_batch runs its own eager path
        try:
            result["generate_batch"] = generate_batch(model, cfg, args.num_prompts, 128, 128)
        except Exception as exc:  # record why the peer could not run rather than lose the run
            result["generate_batch"] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
        out.write_text(json.dumps(result, indent=2))
        print("generate_batch", json.dumps(result["generate_batch"]), flush=True)
    if "bs1" not in skip:
        try:
            result["decode_bs1"] = decode_bs1(model, cfg)
        except Exception as exc:
            result["decode_bs1"] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
        print("decode_bs1", json.dumps(result["decode_bs1"]), flush=True)
    out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
