"""The output head (lm_head) quantized with the decoder's int8 linears on CPUs: on by default
where the W8A8 kernel serves, its logits the integer reference of its weight (the embedding's
own rows where tied, whose lookup stays exact), off on request, and refused where it is not
served (GPUs, other schemes, tensor parallelism)."""

import json

import pytest
import torch

from soberana.distributed.loader import check_tp_quantization
from soberana.models.loader import load_model, read_model_config
from soberana.ops.cpu import linear_int8
from soberana.quantization import QuantizationConfig, QuantLinear, schemes, with_lm_head
from tests.engine.tiny_models import build_tiny_model

W8A8 = {"w8a8": object()}  # Kernels.int8_linears of a CPU with the W8A8 kernel


def _needs_w8a8():
    if "w8a8" not in linear_int8.int8_kernels():
        pytest.skip("no W8A8 int8 kernel in this build on this CPU")


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny(request, tmp_path_factory):
    # hidden 64: a multiple of the W8A8 kernel's activation block (32)
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), "llama",
                            tie_word_embeddings=request.param)  # fmt: skip


def _load(path, dtype, **fields):
    return load_model(path, dtype, torch.device("cpu"), 256,
                      quantization=QuantizationConfig.named("int8", **fields))  # fmt: skip


def _checkpoint_head(path) -> torch.Tensor:
    from safetensors.torch import load_file

    tensors = load_file(str(path / "model.safetensors"))
    tied = json.loads((path / "config.json").read_text())["tie_word_embeddings"]
    return tensors["model.embed_tokens.weight" if tied else "lm_head.weight"]


def _checkpoint_embedding(path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))["model.embed_tokens.weight"]


def test_default_quantizes_the_head_only_for_int8_w8a8_on_cpus():
    int8 = QuantizationConfig.named("int8")
    assert int8.resolved(torch.device("cpu"), W8A8).lm_head_quantized is True
    assert int8.resolved(torch.device("cpu"), {}).lm_head_quantized is False  # no W8A8 kernel
    assert int8.resolved(torch.device("cuda"), W8A8).lm_head_quantized is False
    for other in ("int8_w8a16", "int4", "fp8"):
        cfg = QuantizationConfig.named(other).resolved(torch.device("cpu"), W8A8)
        assert cfg.lm_head_quantized is False, other
    assert QuantizationConfig.named("int8", source="compressed-tensors").resolved(
        torch.device("cpu"), W8A8).lm_head_quantized is False  # fmt: skip
    off = with_lm_head(int8, False)
    assert off.resolved(torch.device("cpu"), W8A8).lm_head_quantized is False


def test_a_quantized_head_where_it_is_not_served_is_a_clear_error(tiny):
    on = with_lm_head(QuantizationConfig.named("int8"), True)
    with pytest.raises(ValueError, match="lm_head_quantized.*on CPUs"):
        on.verify_supported(torch.device("cuda"))
    with pytest.raises(ValueError, match="lm_head_quantized"):
        with_lm_head(QuantizationConfig.named("int4"), True).verify_supported(torch.device("cpu"))
    with pytest.raises(ValueError, match="needs a quantization scheme"):
        with_lm_head(None, True)
    assert with_lm_head(None, False) is None
    cfg = read_model_config(tiny)[0]
    with pytest.raises(ValueError, match="lm_head_quantized.*tensor_parallel_size > 1"):
        check_tp_quantization(on, cfg, 2)
    check_tp_quantization(QuantizationConfig.named("int8"), cfg, 2)  # default: head unquantized


def test_the_head_does_not_change_the_kv_fingerprint():
    int8 = QuantizationConfig.named("int8")
    assert with_lm_head(int8, True).kv_identity() == with_lm_head(int8, False).kv_identity()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantized_head_logits_equal_the_integer_reference(tiny, dtype):
    _needs_w8a8()
    loaded = _load(tiny, dtype)
    model = loaded.model
    assert loaded.quantization.lm_head_quantized is True
    assert "output head (lm_head) int8" in loaded.quantization.describe()
    head = model.lm_head
    assert isinstance(head, QuantLinear) and head.cpu_kernel is not None
    assert head.cpu_kernel.activations.endswith("(W8A8)")
    w = _checkpoint_head(tiny)
    tied = model.config.tie_word_embeddings
    q, scale = schemes.quantize_int8(w)  # the checkpoint's rows, quantized as they are read
    got_q, got_scale = head.method.quantized(head)
    assert torch.equal(got_q, q)
    assert torch.allclose(got_scale.float(), scale.to(dtype).float())
    # the embedding lookup stays exact: the tied checkpoint rows in the model dtype
    ids = torch.tensor([0, 5, 63, 64, w.shape[0] - 1])
    if tied:  # one int8 copy: the lookup reads the head's rows, dequantized
        assert model.embed_tokens is None
        rows = model.lm_head.embedding(ids)
        assert rows.dtype == dtype
        assert torch.equal(rows, (got_q[ids].float() * got_scale[ids].float()[:, None]).to(dtype))
    else:
        assert torch.equal(model.embed_tokens.weight, _checkpoint_embedding(tiny).to(dtype))
    hidden = torch.randn(5, w.shape[1], generator=torch.Generator().manual_seed(0)).to(dtype)
    logits = model.compute_logits(hidden)
    ref = schemes.int8_w8a8_reference(hidden, got_q, got_scale)
    # exact integer dot products; only the float32 sum over blocks has an order, and bfloat16
    # outputs round once
    bound = 1e-6 if dtype == torch.float32 else 4e-3
    assert ((logits - ref).abs().max() / ref.abs().max()).item() < bound
    # and close to the float head: the int8 rounding of weights and activations only
    exact = hidden.float() @ w.float().T
    assert ((logits - exact).norm() / exact.norm()).item() < 0.02


def test_head_kept_unquantized_on_request(tiny):
    loaded = _load(tiny, torch.bfloat16, lm_head_quantized=False)
    assert not isinstance(loaded.model.lm_head, QuantLinear)
    assert loaded.model.embed_tokens is not None
    assert "lm_head" not in loaded.quantization.describe()
    quantized = _load(tiny, torch.bfloat16)
    assert quantized.fingerprint == loaded.fingerprint  # the same keys and values


def test_engine_reports_the_int8_head_in_v1_models_info(tiny):
    _needs_w8a8()
    from soberana import LLM, SamplingParams
    from tests.engine.tiny_models import prompts_of_lengths

    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for head in (True, False):
        llm = LLM(str(tiny), dtype="bfloat16", quantization="int8", lm_head_quantized=head,
                  kv_cache_gb=0.05, max_model_len=128)  # fmt: skip
        # ModelInfo.quantization is /v1/models' "quantization" field
        assert ("output head (lm_head) int8" in llm.engine.model_info.quantization) is head
        outs = llm.generate(prompts_of_lengths([7, 30]), params)
        assert [len(o.outputs[0].token_ids) for o in outs] == [6, 6]
