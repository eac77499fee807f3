"""The built-in demo model: random weights — for smoke tests and trying the stack offline.

A small Llama-shaped model with deterministic random weights (fixed seed) and a byte-level
BPE tokenizer trained with `tokenizers` on the text below, saved once under a cache directory.
Its output is meaningless text: it proves the machinery, not a model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from soberana.cache import cache_root

DEMO_VERSION = 1
DEMO_NAME = "soberana-demo"
LABEL = "random weights — for smoke tests and trying the stack offline"

_SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
}
_SPECIAL = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Training text written for this project; byte-level BPE still covers every byte.
_CORPUS = """\
Soberana runs language models on hardware that its owners control. A bank, a hospital or a
town hall keeps its prompts, its documents and its models inside its own walls, and still
serves them to every application through the same interface that cloud services offer.
The engine reads a prompt, splits it into tokens, and fills a cache of keys and values, one
block of sixteen tokens at a time. Each full block is named by a hash of its tokens and of
the block before it, so two requests that share a beginning share the same blocks, and the
second one skips the work the first one already did. When memory runs short, the scheduler
pauses the newest request, frees its blocks, and computes them again later.
Every step of the engine spends one budget of tokens: some requests continue their answers
one token at a time, while others read a slice of a long prompt. Mixing both keeps the
machine busy and keeps the first token of a new request close at hand.
The sampler turns scores into choices: greedy picks the best token; temperature, top k,
top p and min p shape the distribution; penalties discourage repetition; a seed makes a
sample repeatable whatever else runs beside it. Stop strings end an answer early.
Operators watch queues, cache usage and latency on dashboards, and benchmark the service
before they trust it. The gateway routes each request to a backend that may serve it, in the
right region, with the right privacy, and moves on to the next one when a backend fails.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048 4096 8192.
Punctuation: . , ; : ! ? ' " ( ) [ ] { } < > / \\ | - _ + = * & % $ # @ ~ ` ^
Accents and scripts: café, naïve, señor, Zürich, Kraków, Ελλάδα, Москва, 東京, 서울, مرحبا.
Hello! How are you today? I am fine, thank you. What is the capital of France? Paris.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
"""


def demo_model_path() -> Path:
    """The demo model's directory, built on first use (atomic: concurrent callers are safe)."""
    final = cache_root() / f"{DEMO_NAME}-v{DEMO_VERSION}"
    if (final / "model.safetensors").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}-", dir=final.parent))
    try:
        _build(tmp)
        try:
            tmp.rename(final)
        except OSError:
            if not (final / "model.safetensors").is_file():  # another process won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _build(out: Path) -> None:
    tokenizer = _train_tokenizer()
    tokenizer.save_pretrained(str(out))
    vocab_size = len(tokenizer)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **_SHAPE,
        "vocab_size": vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.convert_tokens_to_ids("<s>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("</s>"),
        "torch_dtype": "float32",
        "soberana_demo": LABEL,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("</s>", "<|end|>")]
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config["bos_token_id"], "eos_token_id": eos}, indent=2)
    )
    _write_weights(out, config)
    (out / "README.md").write_text(
        f"# {DEMO_NAME} v{DEMO_VERSION}\n\nSoberana's built-in demo model: {LABEL}.\n"
        "Its answers are meaningless. Serve a real model with `soberana serve /path/to/model`.\n"
    )


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    # The submodule, not `from transformers import ...`: LLM imports transformers in a thread
    # meanwhile, and the package's lazy attribute lookup is not thread-safe.
    from transformers.tokenization_utils_fast import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        chat_template=_CHAT_TEMPLATE,
        model_max_length=_SHAPE["max_position_embeddings"],
    )


def _write_weights(out: Path, config: dict) -> None:
    import torch
    from safetensors.torch import save_file

    h, inter, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    d = h // heads
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (heads * d, h),
            p + "self_attn.k_proj.weight": (kv_heads * d, h),
            p + "self_attn.v_proj.weight": (kv_heads * d, h),
            p + "self_attn.o_proj.weight": (h, heads * d),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    gen = torch.Generator().manual_seed(20261123)
    tensors = {}
    for name in sorted(shapes):
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shapes[name])
        else:
            # std 0.1 (not 0.02) gives the random model peaked, varied next-token choices.
            tensors[name] = torch.randn(shapes[name], generator=gen) * 0.1
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--print-path", action="store_true", help="only print the directory")


def run(args: argparse.Namespace) -> int:
    path = demo_model_path()
    if args.print_path:
        print(path)
    else:
        print(f"{DEMO_NAME} v{DEMO_VERSION} ({LABEL})\n{path}")
    return 0
