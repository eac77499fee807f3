"""The compute backend (soberana/ops/backend.py): chosen once at start from
`EngineConfig.compute_backend`, logged with the reason for every slower path, reported in
ModelInfo, and held by the model's layers (nothing is chosen per call)."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from soberana import LLM, SamplingParams
from soberana.engine.config import COMPUTE_BACKENDS, EngineConfig
from soberana.ops import backend
from soberana.ops.backend import TORCH_KERNELS, select_backend
from soberana.ops.cpu import kernels as cpu_kernels
from tests.engine.tiny_models import build_tiny_model

CPU = torch.device("cpu")
needs_native = pytest.mark.skipif(
    cpu_kernels.attention_library() is None or cpu_kernels.layers_library() is None,
    reason="no C compiler here",
)
has_avx512_bf16 = "avx512_bf16" in cpu_kernels.cpu_flags()
has_avx2 = {"avx2", "fma"} <= cpu_kernels.cpu_flags()


@pytest.fixture
def isa():
    """Set the ISA of the native kernels for one test (EngineConfig.cpu_isa), then restore it."""
    yield lambda name: cpu_kernels.set_isa(name)
    cpu_kernels.set_isa("native")


def test_the_config_and_the_backend_name_the_same_choices():
    # engine/config.py writes them out so that parsing flags needs no torch
    assert COMPUTE_BACKENDS == backend.COMPUTE_BACKENDS
    with pytest.raises(ValueError, match="compute_backend must be one of auto, torch"):
        EngineConfig(compute_backend="cuda").validate()
    with pytest.raises(ValueError, match="compute_backend must be one of"):
        select_backend("fast", CPU, torch.float32)


@needs_native
def test_auto_and_native_choose_the_native_kernels_on_a_cpu(caplog):
    caplog.set_level(logging.INFO, logger="soberana.ops")
    auto = select_backend("auto", CPU, torch.float32)
    native = select_backend("native", CPU, torch.float32)
    assert auto.name == native.name == "native"
    assert auto.requested == "auto" and native.requested == "native"
    k = auto.kernels
    assert k.add_rms_norm is cpu_kernels.add_rms_norm and k.argmax is cpu_kernels.argmax
    assert k.paged_attention is cpu_kernels.paged_attention_step
    assert k.rope_and_cache is cpu_kernels.rope_and_cache and k.pack_cpu_linears
    assert k.fused_decode_attention is None and k.gemv is None  # Triton's only
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compute")]
    assert lines[0].startswith("Compute backend: native (attention native ")
    assert "(asked: auto)" in lines[0] and "(asked" not in lines[1]


def test_torch_is_the_portable_path_everywhere(caplog):
    caplog.set_level(logging.INFO, logger="soberana.ops")
    chosen = select_backend("torch", CPU, torch.bfloat16)
    assert chosen.name == "torch" and chosen.kernels is TORCH_KERNELS
    assert not chosen.kernels.pack_cpu_linears and chosen.kernels.decoder_stack is None
    assert chosen.report() == {"compute_backend": "torch", "requested": "torch",
                               "kernels": {"all ops": "PyTorch"}, "fallbacks": []}  # fmt: skip
    assert "Compute backend: torch (all ops PyTorch)" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_triton_and_native_refuse_a_device_they_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # tests/ops runs Triton interpreted
    with pytest.raises(ValueError, match="triton needs a CUDA device"):
        select_backend("triton", CPU, torch.float32)
    with pytest.raises(ValueError, match="native runs on CPUs"):
        select_backend("native", torch.device("cuda"), torch.bfloat16)


def test_a_failed_triton_import_is_a_logged_fallback_or_an_error(monkeypatch, caplog):
    """auto on a GPU without a usable Triton: the PyTorch path, with a warning saying why (the
    old code dropped to it silently); asked for by name: an error at start."""
    import soberana.ops.triton as triton_package

    monkeypatch.setitem(sys.modules, "soberana.ops.triton.attention", None)  # ImportError
    monkeypatch.delattr(triton_package, "attention", raising=False)  # if imported before
    caplog.set_level(logging.INFO, logger="soberana.ops")
    chosen = select_backend("auto", torch.device("cuda"), torch.bfloat16)
    assert chosen.name == "torch" and chosen.kernels is TORCH_KERNELS
    assert len(chosen.fallbacks) == 1 and "Triton kernels unavailable" in chosen.fallbacks[0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"Slower path: {chosen.fallbacks[0]}"]
    with pytest.raises(RuntimeError, match="compute_backend triton: Triton kernels unavailable"):
        select_backend("triton", torch.device("cuda"), torch.bfloat16)


@needs_native
@pytest.mark.skipif(not has_avx512_bf16, reason="no AVX512_BF16 on this CPU")
def test_a_cpu_with_avx512_bf16_takes_every_fast_path(isa, caplog):
    isa("native")
    caplog.set_level(logging.INFO, logger="soberana.ops")
    chosen = select_backend("auto", CPU, torch.bfloat16)
    impls = chosen.implementations
    assert impls["attention"] == "native AVX-512"
    assert impls["bf16 linears"] == "soberana AVX512_BF16"
    assert impls["decoder stack"] == "one native call per step"
    assert chosen.kernels.decoder_stack is not None and chosen.fallbacks == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@needs_native
@pytest.mark.skipif(not has_avx2, reason="no AVX2 + FMA on this CPU")
def test_an_avx2_build_warns_once_that_bf16_linears_are_widened(isa, caplog):
    """The path of CPUs without AVX-512 (forced with cpu_isa avx2): bf16 linears on AVX2 + FMA,
    one warning naming why; float32 is served without a slower path."""
    isa("avx2")
    caplog.set_level(logging.INFO, logger="soberana.ops")
    bf16 = select_backend("auto", CPU, torch.bfloat16, cpu_isa="avx2")
    assert bf16.implementations["attention"] == "native AVX2+FMA"
    assert bf16.implementations["bf16 linears"].startswith("soberana AVX2+FMA")
    assert len(bf16.fallbacks) == 1
    assert bf16.fallbacks[0].startswith("cpu_isa avx2 (no AVX512_BF16 in the build): bf16 "
                                        "linears on AVX2+FMA")  # fmt: skip
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"Slower path: {bf16.fallbacks[0]}"]
    fp32 = select_backend("auto", CPU, torch.float32, cpu_isa="avx2")
    assert fp32.implementations["fp32 linears"] == "soberana AVX2+FMA" and fp32.fallbacks == []


@needs_native
def test_a_portable_build_falls_back_to_onednn_linears_and_modules(isa):
    isa("portable")
    chosen = select_backend("auto", CPU, torch.bfloat16, cpu_isa="portable")
    assert chosen.implementations["attention"] == "native portable C"
    # no bf16 linear kernel: a bfloat16 model's layers run as modules (the stack, offered for
    # models whose projections all have native kernels, is refused by such a model at load:
    # tests/ops/test_cpu_forward.py)
    assert any(why.startswith("no bf16 linear kernel in the cpu_isa portable build")
               and "decoder layers as modules" in why for why in chosen.fallbacks)  # fmt: skip
    assert any("portable C" in why for why in chosen.fallbacks)


@needs_native
def test_a_cpu_without_a_bf16_linear_kernel_says_so(monkeypatch):
    """As on a CPU with neither AVX512_BF16 nor AVX2: oneDNN's bf16 linears, logged why."""
    monkeypatch.setattr(cpu_kernels, "linear_library", lambda: None)
    chosen = select_backend("native", CPU, torch.bfloat16)
    assert chosen.implementations["bf16 linears"] in ("oneDNN (packed once)", "PyTorch F.linear")
    assert "bf16 linears via" in chosen.fallbacks[-1]


def test_no_native_kernels_is_the_torch_path_for_auto_and_an_error_for_native(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "attention_library", lambda: None)
    monkeypatch.setitem(cpu_kernels._failures, "paged_attention.c", "cc: not found")
    chosen = select_backend("auto", CPU, torch.float32)
    assert chosen.name == "torch" and chosen.kernels is TORCH_KERNELS
    assert "native CPU kernels unavailable (paged_attention.c: cc: not found)" in chosen.fallbacks[0]
    with pytest.raises(RuntimeError, match="compute_backend native: native CPU kernels"):
        select_backend("native", CPU, torch.float32)


@needs_native
def test_an_fp8_cache_keeps_attention_on_pytorch_and_says_why():
    chosen = select_backend("auto", CPU, torch.float32, kv_cache_dtype=torch.float8_e4m3fn)
    assert chosen.implementations["attention"] == "PyTorch (FP8 cache)"
    assert chosen.kernels.rope_and_cache is None
    assert any(why.startswith("kv_cache_dtype fp8") for why in chosen.fallbacks)


@needs_native
@pytest.mark.parametrize("compute_backend", ["auto", "torch"])
def test_the_engine_reports_its_choice_and_the_layers_hold_it(tmp_path, compute_backend):
    """ModelInfo (what /v1/models shows) names the backend; every layer holds that backend's
    functions; both backends generate the same greedy tokens for a float32 model."""
    build_tiny_model(tmp_path, "llama")
    llm = LLM(str(tmp_path), dtype="float32", max_model_len=64, kv_cache_gb=0.01,
              compute_backend=compute_backend)  # fmt: skip
    info = llm.engine.model_info.compute
    want = "native" if compute_backend == "auto" else "torch"
    assert info["compute_backend"] == want and info["requested"] == compute_backend
    model = llm.engine.worker.model
    kernels = llm.engine.worker.backend.kernels
    layer = model.layers[0]
    assert layer.input_layernorm.add_norm is kernels.add_rms_norm
    assert layer.silu_and_mul is kernels.silu_and_mul
    assert layer.self_attn.paged_attention is kernels.paged_attention
    assert llm.engine.sampler.argmax is kernels.argmax
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=6,
                                                      ignore_eos=True), use_tqdm=False)  # fmt: skip
    tokens = out[0].outputs[0].token_ids
    assert len(tokens) == 6
    if compute_backend == "torch":  # the reference path: the native one must agree with it
        native = LLM(str(tmp_path), dtype="float32", max_model_len=64, kv_cache_gb=0.01)
        again = native.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=6,
                                                               ignore_eos=True), use_tqdm=False)  # fmt: skip
        assert again[0].outputs[0].token_ids == tokens


@needs_native
def test_int8_kernels_are_chosen_once_by_the_backend():
    """The native backend carries this build's int8 kernels (W8A8 on AVX512_VNNI or AVX2);
    a quantized layer takes its kernel from them at load."""
    from soberana.ops.cpu import linear_int8

    chosen = select_backend("auto", CPU, torch.bfloat16)
    assert set(chosen.kernels.int8_linears) == set(linear_int8.int8_kernels())
    flags = cpu_kernels.cpu_flags()
    if "avx512_vnni" in flags or "avx2" in flags:
        assert "W8A8" in chosen.kernels.int8_linears["w8a8"].name
    assert TORCH_KERNELS.int8_linears == {}  # the torch backend: PyTorch's int8 path
