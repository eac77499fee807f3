"""Tiny random Hugging Face models of each supported architecture, and transformers references."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from soberana.models.loader import resolve_model_path

ARCHS = {
    # name: (transformers config class name, extra config)
    "llama": ("LlamaConfig", {}),
    "llama31": ("LlamaConfig", {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}, "rope_theta": 500000.0}),
    "llama32-tied": ("LlamaConfig", {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
}


def build_tiny_model(out: Path, arch: str, seed: int = 0, **config: object) -> Path:
    """Save a tiny random `arch` model (float32) plus the demo tokenizer into `out`; `config`
    replaces fields of the transformers config (e.g. `num_key_value_heads=1`)."""
    import transformers

    demo = resolve_model_path("demo")
    for f in demo.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, out / f.name)
    cls_name, extra = ARCHS[arch]
    fields = dict(
        vocab_size=934, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        initializer_range=0.1, bos_token_id=0, eos_token_id=1, pad_token_id=0, **extra,
    )
    hf_config = getattr(transformers, cls_name)(**(fields | config))
    hf_config.architectures = [cls_name.replace("Config", "ForCausalLM")]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    if arch == "qwen2":  # make the q/k/v biases matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                             layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.save_pretrained(out)
    return out


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of one unpadded prompt, never stopping at EOS."""
    from transformers import GenerationConfig

    ids = torch.tensor([prompt])
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    model.generation_config.eos_token_id = None  # otherwise merged in and stops generation
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    tokens = out[0, len(prompt):].tolist()
    assert len(tokens) == max_new_tokens, "the reference stopped early"
    return tokens


def prompts_of_lengths(lengths: list[int], seed: int = 1, vocab: int = 934) -> list[list[int]]:
    """Distinct random prompts (ids 6.. avoid the special tokens)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(6, vocab, (n,), generator=g).tolist() for n in lengths]
