"""Quantization under tensor parallelism (CPU, gloo, 2 processes): greedy tokens equal one
rank's for int8 (weight-only int8_w8a16, and CPUs' default W8A8 with activations int8 per
block of 32: a row-parallel shard of these models' widths splits at a block boundary, so the
blocks are the same), int4 and fp8 quantized at load, compressed-tensors checkpoints and a
GGUF file; an int4 shard that would cut a group is refused by name. Without processes, each
rank's quantized weights are checked to be exact slices of the one-rank engine's.

Tokens, not logits, are compared end to end: the row-parallel all-reduce adds two partial
sums where one rank adds all products in one order, so logits differ in the last bits; on
these tiny models no greedy token changes (the int8 tests have held that since 8bcd8b5), and
the exact-slices test pins the weights themselves bit for bit."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from soberana import LLM, SamplingParams
from soberana.distributed.loader import load_sharded_model
from soberana.distributed.sharding import plan_shard
from soberana.models.gguf import linear_types, open_gguf
from soberana.models.loader import load_model, read_model_config
from soberana.quantization import QuantLinear, gguf_quantization, resolve_quantization, with_lm_head

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))
from tiny_models import build_tiny_model, prompts_of_lengths  # noqa: E402

CASES = {
    "llama": ("llama", {}),
    "qwen2-kv1": ("qwen2", {"num_key_value_heads": 1}),  # q/k/v biases, replicated KV head
}


def _generate(path: Path, tp: int, quantization: str | None) -> tuple[list[list[int]], object]:
    # the vocabulary-parallel head stays in the model dtype: the one-rank engine is compared
    # with its head so too (its CPU default quantizes it with int8)
    head = {"lm_head_quantized": False} if quantization is not None else {}
    llm = LLM(str(path), dtype="float32", max_model_len=128, max_num_batched_tokens=32,
              tensor_parallel_size=tp, quantization=quantization, **head)
    try:
        out = llm.generate(prompts_of_lengths([40, 23, 57], seed=11, vocab=935),
                           SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        return [o.outputs[0].token_ids for o in out], llm.engine.model_info
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("scheme", ["int8_w8a16", "int8"])
@pytest.mark.parametrize("name", list(CASES))
def test_int8_greedy_tokens_match_one_rank_int8(tmp_path, name, scheme):
    arch, fields = CASES[name]
    path = build_tiny_model(tmp_path, arch, vocab_size=935, **fields)
    expected, info_1 = _generate(path, 1, scheme)
    if scheme == "int8_w8a16":  # (W8A8 happens to keep these tiny models' greedy tokens)
        unquantized, _ = _generate(path, 1, None)
        assert expected != unquantized  # int8 changes this model's tokens: the test can tell
    tokens, info_2 = _generate(path, 2, scheme)
    assert tokens == expected
    assert info_2.quantization == info_1.quantization
    assert info_2.quantization_kernels


def test_a_quantized_head_is_refused_before_workers_start(tmp_path):
    path = build_tiny_model(tmp_path, "llama", vocab_size=935)
    with pytest.raises(ValueError, match="lm_head_quantized is not supported with "
                                         "tensor_parallel_size > 1"):
        LLM(str(path), dtype="float32", max_model_len=64, tensor_parallel_size=2,
            quantization="int8", lm_head_quantized=True)


# int4's groups of 128 inputs need row-parallel shards (o_proj: 256 / 2, down_proj: 512 / 2)
# of whole groups: wider than the other tests' models (64 / 2 and 128 / 2).
WIDE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4}


@pytest.mark.parametrize("name", list(CASES))
def test_int4_greedy_tokens_match_one_rank_int4(tmp_path, name):
    """Each rank quantizes only its columns of o_proj / down_proj (whole groups of 128), so
    its int4 values, scales and zero points are the one-rank engine's; only the float
    summation order of the row-parallel all-reduce differs."""
    arch, fields = CASES[name]
    path = build_tiny_model(tmp_path, arch, vocab_size=935, **WIDE, **fields)
    expected, info_1 = _generate(path, 1, "int4")
    if name == "llama":
        unquantized, _ = _generate(path, 1, None)
        assert expected != unquantized  # int4 changes this model's tokens: the test can tell
    tokens, info_2 = _generate(path, 2, "int4")
    assert tokens == expected
    assert info_2.quantization == info_1.quantization


@pytest.mark.parametrize("name", list(CASES))
def test_fp8_greedy_tokens_match_one_rank_fp8(tmp_path, name):
    """fp8 (weight-only on CPUs): per-row scales over whole rows, as int8."""
    arch, fields = CASES[name]
    path = build_tiny_model(tmp_path, arch, vocab_size=935, **fields)
    expected, info_1 = _generate(path, 1, "fp8")
    tokens, info_2 = _generate(path, 2, "fp8")
    assert tokens == expected
    assert info_2.quantization == info_1.quantization


def test_int4_shard_that_would_cut_a_group_is_refused_before_workers_start(tmp_path):
    # o_proj's 64 inputs take int4 groups of 64 (schemes.group_size_for): 2 shards of 32
    path = build_tiny_model(tmp_path, "llama", vocab_size=935)
    with pytest.raises(ValueError, match=r"int4 .*tensor_parallel_size 2: o_proj is split along "
                                         r"its 64 inputs into shards of 32, which would cut its "
                                         r"groups of 64 inputs"):
        LLM(str(path), dtype="float32", max_model_len=64, tensor_parallel_size=2,
            quantization="int4")


@pytest.mark.parametrize("scheme", ["w8a16", "w4a16", "fp8"])
def test_compressed_tensors_checkpoint_greedy_tokens_match_one_rank(tmp_path, scheme):
    """A pre-quantized checkpoint (llm-compressor's layout, written by the quantization
    tests: W8A16 per channel, W4A16 in int32 words with groups of 32, FP8 with one scale per
    tensor): each rank reads its rows / columns of the stored tensors, and of the group
    scales; per-channel and per-tensor scales whole."""
    from tests.quantization.test_checkpoints import _compressed_checkpoint

    (tmp_path / "float").mkdir()
    arch, fields = CASES["qwen2-kv1"]
    src = build_tiny_model(tmp_path / "float", arch, vocab_size=935, **fields)
    path = tmp_path / scheme
    _compressed_checkpoint(src, path, scheme)
    expected, info_1 = _generate(path, 1, None)
    tokens, info_2 = _generate(path, 2, None)
    assert tokens == expected
    assert "compressed-tensors" in info_2.quantization
    assert info_2.quantization == info_1.quantization


# ---- GGUF: a wide Llama whose projections mix llama.cpp's block types --------------------------

def _mixed_blocks(name: str, value):
    """q/k/v and o_proj in Q4_K (o_proj's shards of 128 inputs cut its 256-value super-blocks:
    read as whole rows), gate Q8_0, up Q4_0, down_proj Q6_K (shards of 256: whole blocks)."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    from tests.quantization.gguf_kquants import quantize_q4_k, quantize_q6_k

    if not name.endswith("_proj.weight"):
        return None
    if ".mlp.gate_proj." in name:
        return T.Q8_0, quantize(value, T.Q8_0)
    if ".mlp.up_proj." in name:
        return T.Q4_0, quantize(value, T.Q4_0)
    if ".mlp.down_proj." in name:
        return T.Q6_K, quantize_q6_k(value)
    return T.Q4_K, quantize_q4_k(value)


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory) -> Path:
    pytest.importorskip("gguf")
    from tests.models.test_gguf import _write_gguf

    root = tmp_path_factory.mktemp("tp_gguf")
    (root / "hf").mkdir()
    hf = build_tiny_model(root / "hf", "llama", vocab_size=935, **WIDE)
    return _write_gguf(hf, root / "tiny-llama.mixed.gguf", _mixed_blocks)


# int8 and fp8 from GGUF are slow-marked: their shards are pinned bit for bit by the
# exact-slices test below, and their forward is the int8 / fp8 one tested above.
@pytest.mark.parametrize("quantization", [None, "int4", pytest.param("int8", marks=pytest.mark.slow),
                                          pytest.param("fp8", marks=pytest.mark.slow)])
def test_gguf_greedy_tokens_match_one_rank(mixed_gguf, quantization):
    """A GGUF file (q/k rows permuted as llama.cpp's converter writes them): each rank
    dequantizes, or re-packs (int4 keeps the Q4_K / Q4_0 codes in groups of 32; int8
    re-quantizes per row), only its rows, and only its blocks of a row-parallel weight
    where its shard is whole blocks."""
    expected, info_1 = _generate(mixed_gguf, 1, quantization)
    tokens, info_2 = _generate(mixed_gguf, 2, quantization)
    assert tokens == expected
    assert info_2.quantization == info_1.quantization


# ---- each rank's quantized weights are slices of the one-rank engine's, exactly --------------

class _Rank:
    """What loading a shard reads of its group (no collectives run while loading)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size


def _expected_shard(full, shard, name: str, cfg) -> torch.Tensor:
    """Rows / columns of the one-rank layer's weight that rank `shard` must hold."""
    def rows(parts, sizes):
        out, begin = [], 0
        for part, size in enumerate(sizes):
            _, start, length = shard.rows(name, part)
            out.append(full[begin + start:begin + start + length])
            begin += size
        return torch.cat(out)

    if ".qkv_proj." in name:
        return rows(3, [cfg.q_size, cfg.kv_size, cfg.kv_size])
    if ".gate_up_proj." in name:
        return rows(2, [cfg.intermediate_size] * 2)
    _, start, length = shard.rows(name, None)
    return full[:, start:start + length]


def _quantized_source(tmp_path: Path, source: str) -> tuple[Path, str | None]:
    """(model path, --quantization) of `source` (a scheme, a compressed-tensors checkpoint
    or a GGUF re-packed / quantized at load), built in `tmp_path`."""
    from tests.models.test_gguf import _write_gguf
    from tests.quantization.test_checkpoints import _compressed_checkpoint

    (tmp_path / "float").mkdir()
    if source == "int4" or source.startswith("gguf"):  # whole groups of 128 / blocks of 256
        src = build_tiny_model(tmp_path / "float", "llama", vocab_size=935, **WIDE)
    else:
        src = build_tiny_model(tmp_path / "float", "qwen2", vocab_size=935, num_key_value_heads=1)
    kind, _, scheme = source.partition(" ")
    if kind == "gguf":
        return _write_gguf(src, tmp_path / "mixed.gguf", _mixed_blocks), scheme
    if kind == "compressed-tensors":
        _compressed_checkpoint(src, tmp_path / scheme, scheme)
        return tmp_path / scheme, None
    return src, {"int8": "int8_w8a16"}.get(source, source)


SOURCES = ["int4", "fp8", "int8", "compressed-tensors w8a16", "compressed-tensors w4a16",
           "compressed-tensors fp8", "gguf int4", "gguf int8", "gguf fp8"]


@pytest.mark.parametrize("source", SOURCES)
def test_each_rank_holds_exact_slices_of_the_one_rank_quantized_weights(tmp_path, source):
    """Without processes: both ranks' shards loaded in this process; every quantized layer's
    dequantized weight must equal its rows (column parallel) or columns (row parallel) of the
    one-rank layer's, bit for bit: scales, group scales and zero points travel with them."""
    pytest.importorskip("gguf")
    path, flag = _quantized_source(tmp_path, source)
    if path.is_file():
        quantization = gguf_quantization(flag, linear_types(open_gguf(path)))
    else:
        quantization = resolve_quantization(flag, json.loads((path / "config.json").read_text()))
    cpu = torch.device("cpu")
    # the one-rank head as the ranks' vocabulary-parallel one: unquantized
    one = load_model(path, torch.float32, cpu, 64, quantization=with_lm_head(quantization, False))
    whole = {n: m.method.dequantize(m) for n, m in one.model.named_modules()
             if isinstance(m, QuantLinear)}
    full = read_model_config(path)[0]
    for rank in range(2):
        part = load_sharded_model(path, torch.float32, cpu, 64, "safetensors", _Rank(rank, 2),
                                  quantization=quantization)
        shard = plan_shard(full, rank, 2)
        layers = {n: m for n, m in part.model.named_modules() if isinstance(m, QuantLinear)}
        assert layers.keys() == whole.keys()
        for name, layer in layers.items():
            want = _expected_shard(whole[name], shard, f"{name}.weight", full)
            assert torch.equal(layer.method.dequantize(layer), want), (source, rank, name)


class _CountingSlice:
    """A checkpoint slice that records the largest part read of it."""

    def __init__(self, src, name: str, reads: dict[str, int]) -> None:
        self.src, self.name, self.reads = src, name, reads

    def get_shape(self):
        return self.src.get_shape()

    def __getitem__(self, index):
        t = self.src[index]
        self.reads[self.name] = max(self.reads.get(self.name, 0), t.numel())
        return t


@pytest.mark.parametrize("source", ["int8", "fp8", "int4", "compressed-tensors w8a16",
                                    "compressed-tensors w4a16", "compressed-tensors fp8"])
def test_a_rank_never_reads_more_than_its_half_of_a_weight_matrix(tmp_path, monkeypatch, source):
    """Peak memory near the shard: of every checkpoint matrix, a rank of 2 reads at most half
    at once (its rows or columns; a per-row scale's largest |value| 32 columns at a time here,
    1,024 in service), except the replicated KV head, which it holds whole."""
    import soberana.distributed.loader as tp_loader

    path, flag = _quantized_source(tmp_path, source)
    quantization = resolve_quantization(flag, json.loads((path / "config.json").read_text()))
    reads: dict[str, int] = {}
    shapes: dict[str, list[int]] = {}
    original = tp_loader._safetensors_slices

    def counting(files):
        for name, src in original(files):
            shapes[name] = src.get_shape()
            yield name, _CountingSlice(src, name, reads)

    monkeypatch.setattr(tp_loader, "_safetensors_slices", counting)
    monkeypatch.setattr(tp_loader, "_AMAX_COLUMNS", 32)
    load_sharded_model(path, torch.float32, torch.device("cpu"), 64, "safetensors", _Rank(0, 2),
                       quantization=quantization)
    matrices = {n: s for n, s in shapes.items() if len(s) == 2 and min(s) > 1}
    assert any("down_proj" in n for n in matrices)
    for name, shape in matrices.items():
        half = -(-shape[0] // 2) * shape[1]  # the vocabulary's 935 rows: 468 on rank 0
        if "k_proj" in name or "v_proj" in name:  # the one KV head is replicated: whole
            half = shape[0] * shape[1]
        assert reads[name] <= half, (name, shape, reads[name])


def test_compressed_int4_shard_that_would_cut_a_stored_group_is_refused(tmp_path):
    # W4A16 groups of 32; 4 ranks split o_proj's 64 inputs into shards of 16
    path, _ = _quantized_source(tmp_path, "compressed-tensors w4a16")
    with pytest.raises(ValueError, match=r"int4 \(compressed-tensors\) with tensor_parallel_size "
                                         r"4: o_proj is split along its 64 inputs into shards of "
                                         r"16, which would cut its groups of 32 inputs"):
        LLM(str(path), dtype="float32", max_model_len=64, tensor_parallel_size=4)
