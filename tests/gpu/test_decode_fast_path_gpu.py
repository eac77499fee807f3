"""The decode fast path on a GPU: fused GEMVs (norm/activation inside) and the fused decode
attention at model shapes in bf16, and the engine's tokens with the path on and off.

Each case draws fresh random inputs (the seed is in the failure message). Outputs are
poisoned: the caching allocator's next block of the output's size is filled with NaN first,
and the cache slots the kernel must write hold NaN, so an element left unwritten fails.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")

from soberana import LLM, SamplingParams  # noqa: E402
from soberana.ops.backend import with_kernels  # noqa: E402
from soberana.ops.triton.decode_attention import DecodeConfig  # noqa: E402
from soberana.ops.triton.fused_decode_attention import fused_decode_attention  # noqa: E402
from soberana.ops.triton.gemv import gemv  # noqa: E402
from tests.engine.tiny_models import prompts_of_lengths  # noqa: E402
from tests.ops.decode_fast_path_cases import (  # noqa: E402
    make_fused_decode_case,
    reference_gemv,
    written_slots,
)
from tests.ops.fused_cases import assert_matches, randn  # noqa: E402
from tests.ops.paged_attention_cases import relative_error  # noqa: E402

# bf16: a float32 sum in another order flips a rounding here and there (~2e-3 normwise).
GEMM_TOLERANCE = {torch.bfloat16: 6e-3, torch.float16: 2e-3, torch.float32: 1e-5}
ATTENTION_TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def _poison_next(shape, dtype):
    """Leave a NaN block of this size at the front of the caching allocator's free list."""
    torch.full(shape, float("nan"), dtype=dtype, device="cuda")


def _check(out, ref, tol, gen):
    torch.cuda.synchronize()
    assert not torch.isnan(out).any(), f"unwritten (NaN) elements (seed {gen.initial_seed()})"
    err = relative_error(out, ref)
    assert err < tol, f"relative error {err:.2e} (seed {gen.initial_seed()})"


# Llama-3.1-8B's projections: (rows of W, K, norm before, gated).
SHAPES = {"qkv": (6144, 4096, True, False), "o": (4096, 4096, False, False),
          "gate_up": (28672, 4096, True, True), "down": (4096, 14336, False, False),
          "ragged": (1000, 1100, True, True)}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gemv_matches_the_unfused_chain_at_model_shapes(dtype, shape, gen):
    rows, k, norm, gated = SHAPES[shape]
    x = randn(1, k, dtype=dtype, device="cuda", gen=gen)
    w = (randn(rows, k, dtype=torch.float32, device="cuda", gen=gen) * k**-0.5).to(dtype)
    bias = randn(rows, dtype=dtype, device="cuda", gen=gen) if shape == "qkv" else None
    kw = {}
    if norm:
        kw = {"norm_weight": randn(k, dtype=dtype, device="cuda", gen=gen), "eps": 1e-5,
              "residual": randn(1, k, dtype=dtype, device="cuda", gen=gen)}  # fmt: skip
    _poison_next((1, rows // 2 if gated else rows), dtype)
    out, new_res = gemv(x, w, bias, gated=gated, **kw)
    ref, ref_res = reference_gemv(x, w, bias, gated=gated, **kw)
    _check(out, ref.float(), GEMM_TOLERANCE[dtype] * (2 if gated else 1), gen)
    if norm:
        assert torch.equal(new_res, ref_res)  # the residual sum is one rounding, exactly


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [2, 3, 5, 8])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_few_row_gemv_matches_the_unfused_chain_at_model_shapes(dtype, rows, shape, gen):
    # each row its own 1 / rms: rows of very different scale
    n, k, norm, gated = SHAPES[shape]
    scale = torch.logspace(-1, 1, rows, device="cuda").unsqueeze(1)
    x = (randn(rows, k, dtype=torch.float32, device="cuda", gen=gen) * scale).to(dtype)
    w = (randn(n, k, dtype=torch.float32, device="cuda", gen=gen) * k**-0.5).to(dtype)
    bias = randn(n, dtype=dtype, device="cuda", gen=gen) if shape == "qkv" else None
    kw = {}
    if norm:
        kw = {"norm_weight": randn(k, dtype=dtype, device="cuda", gen=gen), "eps": 1e-5,
              "residual": randn(rows, k, dtype=dtype, device="cuda", gen=gen)}  # fmt: skip
    _poison_next((rows, n // 2 if gated else n), dtype)
    out, new_res = gemv(x, w, bias, gated=gated, **kw)
    ref, ref_res = reference_gemv(x, w, bias, gated=gated, **kw)
    _check(out, ref.float(), GEMM_TOLERANCE[dtype] * (2 if gated else 1), gen)
    if norm:
        assert torch.equal(new_res, ref_res)


def test_gemv_chain_with_programmatic_dependent_launch_in_a_cuda_graph(gen):
    # Each kernel may start before the previous one ends and waits for it in-kernel; a chain
    # where every GEMV reads the one before it, replayed as a graph, must still be exact.
    ws = [(randn(4096, 4096, dtype=torch.float32, device="cuda", gen=gen) * 4096**-0.5).to(
        torch.bfloat16) for _ in range(6)]  # fmt: skip
    # one row, and five (a verification step of 4 drafts)
    x = randn(1, 4096, dtype=torch.bfloat16, device="cuda", gen=gen)
    x5 = randn(5, 4096, dtype=torch.bfloat16, device="cuda", gen=gen)

    def chain():
        h, h5 = x, x5
        for w in ws:
            h, _ = gemv(h, w)
            h5, _ = gemv(h5, w)
        return h, h5

    eager = chain()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = chain()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert all(map(torch.equal, captured, eager)), gen.initial_seed()


def _fused(case, num_splits=None):
    tile = 16 if case.qkv.dtype == torch.float32 else 64
    cfg = None if num_splits is None else DecodeConfig(tile, 4, 2, num_splits)
    torch.cuda.synchronize()
    _poison_next(case.ref_out.shape, case.qkv.dtype)
    return fused_decode_attention(
        case.qkv, case.positions, case.cos, case.sin, case.slot_mapping, case.k_cache,
        case.v_cache, case.seq_lens, case.block_table, case.num_heads, case.scale,
        q_norm=case.q_norm, k_norm=case.k_norm, config=cfg,
    )  # fmt: skip


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_fused_decode_matches_float32_attention_over_ragged_contexts(group, head_dim,
                                                                   block_size, gen):  # fmt: skip
    contexts = [1, 17, 1000, 4097, 32768]
    case = make_fused_decode_case(contexts, num_heads=8 * group, num_kv_heads=8,
                                  head_dim=head_dim, block_size=block_size,
                                  dtype=torch.bfloat16, device="cuda", gen=gen)  # fmt: skip
    out = _fused(case)
    _check(out, case.ref_out, ATTENTION_TOLERANCE[torch.bfloat16], gen)
    keys, values = written_slots(case)
    assert torch.equal(keys, case.ref_k) and torch.equal(values, case.ref_v)  # bit for bit


@pytest.mark.parametrize("num_splits", [1, 2, 7, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_decode_merges_any_number_of_partitions(num_splits, dtype, gen):
    # Batch 1 at long context is where the merge runs; repeated launches reuse the counters.
    case = make_fused_decode_case([20000], num_heads=32, num_kv_heads=8, head_dim=128,
                                  block_size=16, dtype=dtype, device="cuda", gen=gen)  # fmt: skip
    for _ in range(3):
        out = _fused(case, num_splits)
        _check(out, case.ref_out, ATTENTION_TOLERANCE[dtype], gen)


def test_fused_decode_with_qk_norm_and_padding_rows(gen):
    case = make_fused_decode_case([300, 0, 5000, 1], num_heads=32, num_kv_heads=8,
                                  head_dim=128, block_size=16, dtype=torch.bfloat16,
                                  device="cuda", gen=gen, qk_norm=True)  # fmt: skip
    out = _fused(case)
    _check(out, case.ref_out, ATTENTION_TOLERANCE[torch.bfloat16], gen)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    keys, _ = written_slots(case)
    assert_matches(keys, case.ref_k)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    import transformers

    from soberana.models.loader import resolve_model_path

    out = tmp_path_factory.mktemp("fast-path-llama")
    cfg = transformers.LlamaConfig(
        vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
        num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096,
        initializer_range=0.05,
    )  # fmt: skip
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    for f in resolve_model_path("demo").glob("tokenizer*"):
        (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.mark.parametrize(("dtype", "n_tokens", "min_same"),
                         [("float32", 20, 16), ("bfloat16", 4, 10)])  # fmt: skip
def test_engine_tokens_with_the_fast_path_equal_the_unfused_path(llama_dir, dtype, n_tokens,
                                                                 min_same):  # fmt: skip
    # The fused attention runs for every decode batch, the fused GEMVs for batch 1: the
    # prompts are generated together, then one at a time.
    prompts = prompts_of_lengths([3, 30, 200, 900] * 3, seed=4, vocab=4096)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, detokenize=False)

    def tokens(fused: bool):
        llm = LLM(str(llama_dir), dtype=dtype, max_model_len=2048, kv_cache_gb=2,
                  enable_prefix_caching=False, enforce_eager=not fused)  # fmt: skip
        if not fused:  # the Triton backend without its decode fast path
            model = llm.engine.worker.model
            model.use_kernels(with_kernels(model.kernels, gemv=None, fused_decode_attention=None))
        batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        return batched + [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts[:4]]

    fast = tokens(fused=True)
    unfused = tokens(fused=False)
    same = sum(a[:n_tokens] == b[:n_tokens] for a, b in zip(fast, unfused))
    # float32 differs only in summation order; in bf16 the GEMMs' summation order and the
    # norm's rounding point differ, and this flat random model's near-ties flip: as against
    # transformers, only the first tokens of most prompts must agree.
    assert same >= min_same, (dtype, same)


def test_small_decode_batches_take_the_few_row_gemv_and_keep_the_tokens(llama_dir):
    # float32, decode batches 2..8: the few-row GEMVs in the decode CUDA graphs (batch 3
    # replays bucket 4 with a padding row, 5..7 bucket 8) against cuBLAS and the separate
    # norm / SiLU kernels, eagerly.
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, detokenize=False)
    rows = []

    def counted(x, *a, **kw):
        rows.append(x.shape[0])
        return gemv(x, *a, **kw)

    def engine(few_row: bool):
        llm = LLM(str(llama_dir), dtype="float32", max_model_len=2048, kv_cache_gb=2,
                  max_num_seqs=8, enable_prefix_caching=False, enforce_eager=not few_row)  # fmt: skip
        model = llm.engine.worker.model
        model.use_kernels(with_kernels(model.kernels, gemv=counted if few_row else None))
        if few_row:  # capture the decode graphs again: their warm-up counts the GEMV rows
            llm.engine.worker.graphs.capture()
        return llm

    few_row, cublas = engine(few_row=True), engine(few_row=False)
    assert {1, 2, 4, 8} <= set(rows), sorted(set(rows))  # the graphs' buckets up to 8
    for batch in range(2, 9):
        prompts = prompts_of_lengths([3, 30, 200, 900, 17, 64, 5, 300][:batch], seed=batch,
                                     vocab=4096)  # fmt: skip
        ours = [o.outputs[0].token_ids for o in few_row.generate(prompts, params)]
        ref = [o.outputs[0].token_ids for o in cublas.generate(prompts, params)]
        # summation order alone differs: at most a rare float32 near-tie flips one prompt
        same = sum(a == b for a, b in zip(ours, ref))
        assert same >= batch - 1, (batch, ours, ref)
