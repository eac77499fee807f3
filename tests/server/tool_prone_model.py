"""A tiny random Qwen2 model that starts hermes tool calls by itself.

The demo tokenizer gains `<tool_call>` and `</tool_call>` as single tokens (as Qwen's has);
the model is random except for one residual direction: a constant value bias in the first
layer writes a fixed component into every position's residual stream, and the head reads
that component only into the `<tool_call>` logit. So at temperature 1 each free token is
`<tool_call>` with about `call_rate` probability, and everything else is noise: after the
marker an unconstrained model writes garbage, so only the call grammar makes its calls valid.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from soberana.models.loader import resolve_model_path

HIDDEN = 64


def build_tool_prone_model(out: Path, call_rate: float = 0.08, seed: int = 0) -> Path:
    import transformers

    demo = resolve_model_path("demo")
    tokenizer = transformers.AutoTokenizer.from_pretrained(demo)
    tokenizer.add_tokens(["<tool_call>", "</tool_call>"])  # plain added tokens, as Qwen's
    tokenizer.save_pretrained(out)
    for f in demo.iterdir():
        if f.name == "generation_config.json":
            shutil.copy(f, out / f.name)
    # Rows to spare, as real models have (loading may add a pad token of its own).
    vocab = (len(tokenizer) // 64 + 2) * 64
    config = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        initializer_range=0.02, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    trigger = tokenizer.convert_tokens_to_ids("<tool_call>")
    d0, j0 = 0, 0  # the residual dimension and the value channel that carry the constant
    with torch.no_grad():
        attn = model.model.layers[0].self_attn
        attn.v_proj.bias.zero_()
        attn.v_proj.bias[j0] = 50.0  # attention weights sum to 1: this passes through as is
        attn.o_proj.weight[:, j0] = 0.0
        attn.o_proj.weight[d0, j0] = 1.0
        model.model.norm.weight.fill_(1.0)
        head = model.lm_head.weight
        head[:, d0] = 0.0
        # After the final norm the constant dominates: h[d0] ~ sqrt(HIDDEN).
        boost = math.log(call_rate * (vocab - 1) / (1 - call_rate))
        head[trigger, d0] = boost / math.sqrt(HIDDEN)
    model.save_pretrained(out)
    return out
