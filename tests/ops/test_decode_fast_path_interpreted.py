"""The decode fast-path kernels (GEMV with fused norm/activation, fused decode attention) run by Triton's CPU interpreter on small shapes, against the unfused eager chain.

Float32 and float16 only (the interpreter mishandles bfloat16 in `tl.dot`); tests/gpu covers
bfloat16 at model shapes. Outputs start as NaN or the cache slots being written hold NaN, so
an element a kernel fails to write fails the test.
"""

import os

import pytest
import torch

from tests.ops.interpreted import INTERPRETED

pytest.importorskip("triton")
pytestmark = INTERPRETED

from soberana.ops.triton.decode_attention import DecodeConfig  # noqa: E402
from soberana.ops.triton.fused_decode_attention import fused_decode_attention  # noqa: E402
from soberana.ops.triton.gemv import GemvConfig, gemv  # noqa: E402
from tests.ops.decode_fast_path_cases import (  # noqa: E402
    make_fused_decode_case,
    reference_gemv,
    written_slots,
)
from tests.ops.fused_cases import assert_matches, randn  # noqa: E402
from tests.ops.paged_attention_cases import relative_error  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def _inputs(n, k, dtype, gen, *, rows=1, gated=False, bias=False):
    x = randn(rows, k, dtype=dtype, device="cpu", gen=gen)
    w = randn(2 * n if gated else n, k, dtype=dtype, device="cpu", gen=gen) * k**-0.5
    b = randn(w.shape[0], dtype=dtype, device="cpu", gen=gen) if bias else None
    return x, w.to(dtype), b


def _close(out, ref, dtype):
    assert not torch.isnan(out).any()
    assert relative_error(out, ref) < TOLERANCE[dtype], relative_error(out, ref)


# Shapes whose rows and K split evenly into tiles, ones that leave ragged edges, and odd ones.
EVEN, RAGGED, ODD = (48, 64), (40, 96), (37, 99)
CONFIG = GemvConfig(16, 32, 4, 1)
# several rows: each thread sums 4 columns' products in registers first (chunk_k)
CHUNKED = GemvConfig(8, 32, 4, 1, chunk_k=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [EVEN, RAGGED])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("config", [CONFIG, CHUNKED])
def test_gemv_equals_linear(dtype, shape, bias, rows, config, gen):
    x, w, b = _inputs(*shape, dtype, gen, rows=rows, bias=bias)
    out, res = gemv(x, w, b, config=config)
    assert res is None and out.shape == (rows, shape[0])
    _close(out, reference_gemv(x, w, b)[0], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [EVEN, RAGGED])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("config", [CONFIG, CHUNKED])
def test_gemv_fuses_add_and_rms_norm_before_the_projection(dtype, shape, with_residual, rows,
                                                           config, gen):  # fmt: skip
    x, w, _ = _inputs(*shape, dtype, gen, rows=rows)
    k = shape[1]
    residual = randn(rows, k, dtype=dtype, device="cpu", gen=gen) if with_residual else None
    g = randn(k, dtype=dtype, device="cpu", gen=gen)
    out, res = gemv(x, w, norm_weight=g, eps=1e-5, residual=residual, config=config)
    ref, ref_res = reference_gemv(x, w, norm_weight=g, eps=1e-5, residual=residual)
    _close(out, ref, dtype)
    # The new residual stream is the rounded sum, exactly; without one it is x itself.
    assert torch.equal(res, ref_res)
    if not with_residual:
        assert res is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [EVEN, RAGGED])
@pytest.mark.parametrize(("rows", "config"), [(1, CONFIG), (4, CHUNKED)])
def test_gemv_gated_writes_silu_of_gate_times_up(dtype, shape, rows, config, gen):
    x, w, b = _inputs(*shape, dtype, gen, rows=rows, gated=True, bias=True)
    residual = randn(rows, shape[1], dtype=dtype, device="cpu", gen=gen)
    g = randn(shape[1], dtype=dtype, device="cpu", gen=gen)
    out, _ = gemv(x, w, b, norm_weight=g, residual=residual, gated=True, config=config)
    assert out.shape == (rows, shape[0])
    ref, _ = reference_gemv(x, w, b, norm_weight=g, residual=residual, gated=True)
    _close(out, ref, dtype)


@pytest.mark.parametrize("rows", range(1, 9))
def test_few_row_gemv_equals_the_eager_chain_for_every_row_count(rows, gen):
    # Odd N and K, the default tile shape for the row count (BLOCK_K shrinks as rows grow),
    # and every part of the chain: residual add, RMSNorm with each row's own 1 / rms, bias,
    # SiLU-and-mul. Float32: the sum order alone differs from the eager chain.
    n, k = ODD
    x, w, b = _inputs(n, k, torch.float32, gen, rows=rows, gated=True, bias=True)
    residual = randn(rows, k, dtype=torch.float32, device="cpu", gen=gen)
    # rows of very different scale: a norm shared across rows would show
    residual *= torch.logspace(-2, 2, rows).unsqueeze(1)
    g = randn(k, dtype=torch.float32, device="cpu", gen=gen)
    out, res = gemv(x, w, b, norm_weight=g, eps=1e-5, residual=residual, gated=True)
    ref, ref_res = reference_gemv(x, w, b, norm_weight=g, eps=1e-5, residual=residual,
                                  gated=True)  # fmt: skip
    assert out.shape == (rows, n)
    _close(out, ref, torch.float32)
    assert torch.equal(res, ref_res)


@pytest.mark.parametrize("config", [CONFIG, CHUNKED])
def test_few_row_gemv_rows_do_not_mix(config, gen):
    # A row of NaN (a padding row of a CUDA graph may hold anything) leaves the others as
    # they are computed alone, bit for bit, under the same tile shape.
    n, k = RAGGED
    x, w, b = _inputs(n, k, torch.float32, gen, rows=5, gated=True, bias=True)
    residual = randn(5, k, dtype=torch.float32, device="cpu", gen=gen)
    g = randn(k, dtype=torch.float32, device="cpu", gen=gen)
    x[2] = float("nan")
    kw = {"norm_weight": g, "gated": True, "config": config}
    out, res = gemv(x, w, b, residual=residual, **kw)
    for i in (0, 1, 3, 4):
        alone, alone_res = gemv(x[i : i + 1], w, b, residual=residual[i : i + 1], **kw)
        assert torch.equal(out[i : i + 1], alone) and torch.equal(res[i : i + 1], alone_res)
    assert out[2].isnan().all()


def test_gemv_reads_rows_with_a_stride(gen):
    # a view of every other row of a wider buffer (as a slice of the graphs' static inputs)
    n, k = RAGGED
    wide = randn(6, 2 * k, dtype=torch.float32, device="cpu", gen=gen)
    x = wide[:, :k]
    _, w, _ = _inputs(n, k, torch.float32, gen)
    out, _ = gemv(x, w, config=CONFIG)
    _close(out, reference_gemv(x, w)[0], torch.float32)


def test_gemv_rejects_what_it_cannot_compute():
    with pytest.raises(ValueError, match="1 to 8 rows"):
        gemv(torch.zeros(9, 8), torch.zeros(4, 8))
    with pytest.raises(ValueError, match="1 to 8 rows"):
        gemv(torch.zeros(2, 8).t(), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="chunk_k"):
        gemv(torch.zeros(2, 8), torch.zeros(4, 8), config=GemvConfig(4, 32, 4, 1, chunk_k=3))
    with pytest.raises(ValueError, match="weight"):
        gemv(torch.zeros(1, 8), torch.zeros(4, 6))
    with pytest.raises(ValueError, match="norm_weight"):
        gemv(torch.zeros(1, 8), torch.zeros(4, 8), residual=torch.zeros(1, 8))
    with pytest.raises(ValueError, match="gated"):
        gemv(torch.zeros(1, 8), torch.zeros(5, 8), gated=True)


def _run_fused(case, num_splits=None, tile_n=16):
    cfg = DecodeConfig(tile_n=tile_n, num_warps=4, num_stages=2, num_splits=num_splits)
    return fused_decode_attention(
        case.qkv, case.positions, case.cos, case.sin, case.slot_mapping, case.k_cache,
        case.v_cache, case.seq_lens, case.block_table, case.num_heads, case.scale,
        q_norm=case.q_norm, k_norm=case.k_norm, config=cfg,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize("group", [1, 4])
def test_fused_decode_equals_rotary_then_cache_write_then_attention(dtype, num_splits, group,
                                                                    gen):  # fmt: skip
    # Contexts: the new token alone, under one tile, within one partition, and long enough
    # for several partitions of MIN_TILES tiles (a ragged last one).
    case = make_fused_decode_case([1, 7, 40, 230], num_heads=2 * group, num_kv_heads=2,
                                  head_dim=32, block_size=4, dtype=dtype, device="cpu",
                                  gen=gen)  # fmt: skip
    out = _run_fused(case, num_splits)
    _close(out, case.ref_out, dtype)
    keys, values = written_slots(case)
    # The stored key is the eager chain's rotated key, bit for bit.
    assert torch.equal(keys, case.ref_k) and torch.equal(values, case.ref_v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_decode_with_an_fp8_cache_stores_and_reads_fp8(dtype, gen):
    case = make_fused_decode_case([1, 7, 40, 230], num_heads=8, num_kv_heads=2, head_dim=32,
                                  block_size=4, dtype=dtype, device="cpu", gen=gen,
                                  kv_fp8=True)  # fmt: skip
    out = _run_fused(case, num_splits=3)
    _close(out, case.ref_out, dtype)  # the reference reads keys/values rounded to fp8
    keys, values = written_slots(case)
    # stored as attention.to_kv_cache_dtype stores them on CPUs (values: -0.0 == 0.0)
    assert torch.equal(keys.float(), case.ref_k.float())
    assert torch.equal(values.float(), case.ref_v.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_decode_applies_per_head_qk_norm_first(dtype, gen):
    case = make_fused_decode_case([5, 100], num_heads=8, num_kv_heads=2, head_dim=16,
                                  block_size=4, dtype=dtype, device="cpu", gen=gen,
                                  qk_norm=True)  # fmt: skip
    _close(_run_fused(case, num_splits=2), case.ref_out, dtype)
    keys, _ = written_slots(case)
    # Equal up to the order of the norm's float32 sum (a flipped rounding at most).
    assert_matches(keys, case.ref_k)


def test_fused_decode_padding_rows_write_nothing_and_attend_to_nothing(gen):
    case = make_fused_decode_case([9, 0, 70], num_heads=4, num_kv_heads=2, head_dim=16,
                                  block_size=4, dtype=torch.float32, device="cpu", gen=gen)  # fmt: skip
    before_k = case.k_cache.clone()
    out = _run_fused(case, num_splits=4)
    _close(out, case.ref_out, torch.float32)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    # Only the two real rows' slots changed.
    changed = (case.k_cache != before_k) & ~(case.k_cache.isnan() & before_k.isnan())
    assert changed.any(dim=(2, 3)).sum() == 2


def test_fused_decode_counters_reset_so_repeated_launches_agree(gen):
    case = make_fused_decode_case([150, 3, 90], num_heads=4, num_kv_heads=2, head_dim=16,
                                  block_size=4, dtype=torch.float32, device="cpu", gen=gen)  # fmt: skip
    first = _run_fused(case, num_splits=5)
    again = _run_fused(case, num_splits=5)
    assert torch.equal(first, again)
    _close(again, case.ref_out, torch.float32)


def _fast_path(llm, calls: list[int]) -> None:
    """Put the GPU's fast-path kernels, on the interpreter, into `llm`'s torch path; each
    GEMV call appends its row count to `calls`."""
    from soberana.ops.backend import with_kernels
    from soberana.ops.triton.gemv import MAX_ROWS

    def counted_gemv(x, *a, **k):
        calls.append(x.shape[0])
        return gemv(x, *a, **k)

    model = llm.engine.worker.model
    model.use_kernels(with_kernels(
        model.kernels, gemv=counted_gemv, gemv_max_rows=MAX_ROWS,
        fused_decode_attention=fused_decode_attention, fused_decode_max_batch=64))  # fmt: skip


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_engine_tokens_on_the_fast_path_equal_the_eager_path(arch, tmp_path):
    # The GPU dispatch, forced onto the interpreter: steps of up to 8 tokens through the fused
    # GEMVs (batch-1 and batch-2 decode, a 3-token prefill), decode-only steps through the
    # fused attention (q/k norm for qwen3, biases for qwen2).
    from soberana import LLM, SamplingParams
    from tests.engine.tiny_models import build_tiny_model, prompts_of_lengths

    build_tiny_model(tmp_path, arch)
    prompts = prompts_of_lengths([3, 40])
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, detokenize=False)
    calls = []

    def tokens(fast_path: bool):
        # the torch backend: nn.Linear weights as they are, which the GEMVs read
        llm = LLM(str(tmp_path), device="cpu", dtype="float32", kv_cache_gb=0.01,
                  compute_backend="torch")
        if fast_path:
            _fast_path(llm, calls)
        alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
        return alone, [o.outputs[0].token_ids for o in llm.generate(prompts, params)]

    assert tokens(fast_path=True) == tokens(fast_path=False)
    assert {1, 2, 3} <= set(calls)  # decode alone, decode of two, the short prompt's prefill


def test_speculative_verification_steps_take_the_few_row_path(tmp_path):
    # The target drafts for itself (every draft accepted): each step verifies k = 3 drafts
    # per request, 4 query rows each, 8 for the two requests. Greedy speculation is
    # lossless, on the few-row path as on the eager one.
    from soberana import LLM, SamplingParams
    from tests.engine.tiny_models import build_tiny_model, prompts_of_lengths

    build_tiny_model(tmp_path, "llama")
    prompts = prompts_of_lengths([5, 20], seed=2)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, detokenize=False)
    spec = {"method": "draft_model", "model": str(tmp_path), "num_speculative_tokens": 3}
    calls = []

    def tokens(fast_path: bool, speculate: bool):
        llm = LLM(str(tmp_path), device="cpu", dtype="float32", kv_cache_gb=0.01,
                  compute_backend="torch", speculative_config=spec if speculate else None)
        if fast_path:
            _fast_path(llm, calls)
        out = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        drafts = llm.engine.spec.stats.num_draft_tokens if speculate else 0
        return out, drafts

    reference, _ = tokens(fast_path=False, speculate=False)
    fast, drafts = tokens(fast_path=True, speculate=True)
    assert drafts > 0
    assert fast == reference
    # verification of both requests' drafts (8 rows), or of one request's alone (4 rows)
    assert 8 in calls, sorted(set(calls))
