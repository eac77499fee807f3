"""Quantized models end to end on CPU: on-the-fly schemes through the loader and the engine,
pre-quantized compressed-tensors checkpoints (written here in llm-compressor's layout), the
FP8 KV cache, and the errors a user sees for what is not served."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from soberana.engine.config import EngineConfig
from soberana.engine.core import EngineCore
from soberana.models.loader import load_model
from soberana.quantization import QuantLinear, resolve_quantization, schemes
from soberana.quantization.compressed_tensors import pack_int32
from tests.engine.tiny_models import build_tiny_model

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), "qwen2")


def _quant_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _load(path, quantization):
    hf = json.loads((path / "config.json").read_text())
    q = resolve_quantization(quantization, hf)
    return load_model(path, torch.float32, torch.device("cpu"), 256, quantization=q)


@pytest.mark.parametrize("method", ["int8", "int4", "fp8"])
def test_on_the_fly_quantization_replaces_every_decoder_projection(tiny, method):
    loaded = _load(tiny, method)
    layers = _quant_layers(loaded.model)
    # qkv, o, gate_up, down per layer, and the output head where it is int8 (int8 on CPUs
    # with the W8A8 kernel: tests/quantization/test_lm_head.py)
    assert len(layers) == 2 * 4 + bool(loaded.quantization.lm_head_quantized)
    assert ("lm_head" in layers) is bool(loaded.quantization.lm_head_quantized)
    assert all(m.kernel for m in layers.values())
    plain = load_model(tiny, torch.float32, torch.device("cpu"), 256)
    assert loaded.fingerprint != plain.fingerprint  # its KV blocks are its own


def _compressed_checkpoint(src: Path, dst: Path, scheme: str) -> dict[str, torch.Tensor]:
    """`src` rewritten as llm-compressor would store it; returns the expected dequantized
    weight of each stored projection."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors, out, expected = load_file(str(next(src.glob("*.safetensors")))), {}, {}
    for name, t in tensors.items():
        base = name.rsplit(".", 1)[0]
        if not (base.split(".")[-1] in PROJ and name.endswith(".weight")):
            out[name] = t
            continue
        if scheme == "w8a16":
            q, scale = schemes.quantize_int8(t)
            out[f"{base}.weight"], out[f"{base}.weight_scale"] = q, scale[:, None].bfloat16()
            expected[base] = q.float() * scale[:, None].bfloat16().float()
        elif scheme == "w4a16":  # symmetric, groups of 32, offset-coded int32 words
            g = t.float().reshape(t.shape[0], -1, 32)
            scale = (g.abs().amax(dim=2) / 7).clamp(min=1e-8).bfloat16()
            q = torch.round(g / scale.float()[..., None]).clamp(-8, 7).to(torch.int8)
            q = q.reshape(t.shape)
            out[f"{base}.weight_packed"] = pack_int32(q, 4)
            out[f"{base}.weight_scale"] = scale
            out[f"{base}.weight_shape"] = torch.tensor(list(t.shape))
            expected[base] = (q.float().reshape(g.shape) * scale.float()[..., None]).reshape(t.shape)
        else:  # fp8, one scale per tensor (differs between q, k and v of a fused projection)
            scale = t.abs().max().float() / 448
            out[f"{base}.weight"] = (t / scale).to(torch.float8_e4m3fn)
            out[f"{base}.weight_scale"] = scale.reshape(1)
            out[f"{base}.input_scale"] = torch.ones(1)
            expected[base] = out[f"{base}.weight"].float() * scale
    save_file(out, str(dst / "model.safetensors"))
    weights = {"w8a16": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True},
               "w4a16": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32,
                         "symmetric": True},
               "fp8": {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True}}
    fmt = {"w8a16": "int-quantized", "w4a16": "pack-quantized", "fp8": "float-quantized"}
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": fmt[scheme], "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights[scheme],
                                      "input_activations": None}},
    }
    (dst / "config.json").write_text(json.dumps(cfg))
    return expected


@pytest.mark.parametrize("scheme,method", [("w8a16", "int8"), ("w4a16", "int4"), ("fp8", "fp8")])
def test_compressed_tensors_checkpoint_is_detected_and_served_exactly(tiny, tmp_path, scheme,
                                                                      method):  # fmt: skip
    expected = _compressed_checkpoint(tiny, tmp_path / scheme, scheme)
    loaded = _load(tmp_path / scheme, None)  # no flag: config.json says it
    assert loaded.quantization.method == method
    assert loaded.quantization.source == "compressed-tensors"
    layers = _quant_layers(loaded.model)
    for i in range(2):
        attn = f"model.layers.{i}.self_attn"
        qkv = torch.cat([expected[f"{attn}.{p}"] for p in ("q_proj", "k_proj", "v_proj")])
        got = layers[f"layers.{i}.self_attn.qkv_proj"]
        assert torch.equal(got.method.dequantize(got), qkv)
        down = layers[f"layers.{i}.down_proj"]
        assert torch.equal(down.method.dequantize(down), expected[f"model.layers.{i}.mlp.down_proj"])


def test_flag_that_contradicts_a_quantized_checkpoint_is_refused(tiny, tmp_path):
    _compressed_checkpoint(tiny, tmp_path / "w8", "w8a16")
    hf = json.loads((tmp_path / "w8" / "config.json").read_text())
    with pytest.raises(ValueError, match="conflicts with the checkpoint"):
        resolve_quantization("int4", hf)


def test_unserved_quantization_configs_are_clear_errors():
    with pytest.raises(ValueError, match="quant_method 'gptq'"):
        resolve_quantization(None, {"quantization_config": {"quant_method": "gptq"}})
    with pytest.raises(ValueError, match="quantization must be one of"):
        resolve_quantization("int3", {})
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int8").validate()


def test_fp8_kv_cache_holds_twice_the_tokens_and_names_its_own_layout(tiny):
    base = dict(model=str(tiny), dtype="bfloat16", kv_cache_gb=0.01, max_model_len=256,
                max_num_seqs=4, max_num_batched_tokens=256)
    auto, fp8 = EngineCore(EngineConfig(**base)), EngineCore(EngineConfig(kv_cache_dtype="fp8",
                                                                          **base))
    assert fp8.worker.kv_cache.dtype == torch.float8_e4m3fn
    assert fp8.model_info.num_blocks == 2 * auto.model_info.num_blocks
    assert fp8.model_info.fingerprint != auto.model_info.fingerprint
    assert fp8.model_info.kv_cache_dtype == "fp8"


def test_fp8_kv_prompt_gives_the_same_logprobs_computed_or_found_in_the_prefix_cache(tiny):
    """Over an FP8 cache a prompt's own keys and values are attended as stored (rounded), as
    every later step and the Triton kernels read them: the same prompt prefilled whole and
    prefilled after a prefix-cache hit gives the same logprobs."""
    from soberana import LLM, SamplingParams

    llm = LLM(str(tiny), dtype="float32", kv_cache_dtype="fp8", kv_cache_gb=0.05,
              max_model_len=256, max_num_seqs=4, enable_prefix_caching=True)
    prompt = [(7 * i + 3) % 200 + 5 for i in range(70)]  # four full blocks of 16 and more
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3,
                            detokenize=False)
    fresh, cached = (llm.generate([prompt], params, use_tqdm=False)[0] for _ in range(2))
    assert cached.num_cached_tokens >= 64 and not fresh.num_cached_tokens
    assert fresh.outputs[0].token_ids == cached.outputs[0].token_ids
    for a, b in zip(fresh.outputs[0].logprobs, cached.outputs[0].logprobs, strict=True):
        assert a.keys() == b.keys()
        assert max(abs(a[t].logprob - b[t].logprob) for t in a) < 1e-4
