"""The native CPU layers (soberana/ops/csrc/cpu_layers.c) and oneDNN-packed linears against
the PyTorch path they replace: bit for bit in bfloat16 (they round where it rounds), to the
last bits in float32 (sums in another order)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from soberana.ops.attention import write_kv
from soberana.ops.backend import select_backend
from soberana.ops.cpu import kernels as cpu_kernels
from soberana.ops.cpu import linear as cpu_linear
from soberana.ops.layers import (
    RMSNorm,
    RotaryEmbedding,
    torch_rms_norm,
    torch_rotary_embedding,
    torch_silu_and_mul,
)

needs_kernels = pytest.mark.skipif(
    cpu_kernels.layers_library() is None, reason="no C compiler here"
)
DTYPES = [torch.float32, torch.bfloat16]
# Rows: one, a decode batch, enough to be shared among threads; hidden not a multiple of 16.
SHAPES = [(1, 64), (64, 768), (700, 200)]


def _randn(*shape, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _same(got, want, exact=True):
    """Bit-identical in 16-bit dtypes (`exact=False`: where a float32 sum feeds a rounding,
    at most one element in a thousand off by one ulp); float32 within a few ulps."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    elif exact:
        assert torch.equal(got, want), (got.float() - want.float()).abs().max()
    else:
        off = got != want
        assert off.float().mean() <= 1e-3, off.sum()
        ulp = want.float().abs().clamp_min(1e-30) * 2.0**-7  # bfloat16: 8 significant bits
        assert ((got.float() - want.float()).abs() <= ulp + 1e-30)[off].all()


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_equals_torch(dtype, shape, with_residual, cpu_isa):
    x = _randn(*shape, dtype=dtype, seed=1, scale=3.0)
    residual = _randn(*shape, dtype=dtype, seed=2) if with_residual else None
    weight = _randn(shape[1], dtype=dtype, seed=3)
    out, new_residual = cpu_kernels.add_rms_norm(x, residual, weight, 1e-6)
    summed = x if residual is None else x + residual
    # the mean of squares is summed in another order: 1/rsqrt can differ in its last bit
    _same(out, torch_rms_norm(summed, weight, 1e-6), exact=False)
    if with_residual:
        assert torch.equal(new_residual, summed)
    else:
        assert new_residual is None


@needs_kernels
def test_add_rms_norm_float32_weight_promotes_like_torch(cpu_isa):
    x, weight = _randn(8, 96, dtype=torch.bfloat16), _randn(96, dtype=torch.float32, seed=5)
    out, _ = cpu_kernels.add_rms_norm(x, None, weight, 1e-5)
    want = torch_rms_norm(x, weight, 1e-5)
    assert out.dtype == want.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


@needs_kernels
def test_rms_norm_module_holds_the_native_kernel_and_it_refuses_what_it_cannot_serve():
    native = select_backend("native", torch.device("cpu"), torch.float32).kernels
    norm, head_norm = RMSNorm(64, 1e-6), RMSNorm(32, 1e-6, per_head=True)
    norm.use_kernels(native)
    head_norm.use_kernels(native)
    with torch.no_grad():
        norm.weight.copy_(_randn(64, dtype=torch.float32, seed=4))
    assert norm.add_norm is cpu_kernels.add_rms_norm and norm.norm is cpu_kernels.rms_norm
    # q/k norms are 3-D [T, heads, D] views of the projection: the PyTorch path, chosen once
    assert head_norm.norm is torch_rms_norm
    x, r = _randn(5, 64, dtype=torch.float32), _randn(5, 64, dtype=torch.float32, seed=9)
    out, res = norm(x, r)
    _same(out, torch_rms_norm(x + r, norm.weight, 1e-6))
    assert torch.equal(res, x + r)
    _same(norm(x), torch_rms_norm(x, norm.weight, 1e-6), exact=False)
    with pytest.raises(ValueError, match="add_rms_norm"):
        cpu_kernels.add_rms_norm(x.view(5, 2, 32), None, norm.weight[:32], 1e-6)
    # a column slice (rows not unit-stride inside) is refused too, not misread
    with pytest.raises(ValueError, match="unit-stride"):
        cpu_kernels.add_rms_norm(_randn(5, 128, dtype=torch.float32)[:, ::2], None,
                                 norm.weight, 1e-6)  # fmt: skip


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 64, 700])
def test_silu_and_mul_equals_torch(dtype, rows, cpu_isa):
    gate_up = _randn(rows, 2 * 176, dtype=dtype, scale=4.0)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # saturated and zero gates
    got = cpu_kernels.silu_and_mul(gate_up)
    want = torch_silu_and_mul(gate_up)
    if dtype == torch.float32:  # exp in another polynomial: an ulp or two
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(got, want)
    native = select_backend("native", torch.device("cpu"), dtype).kernels
    assert native.silu_and_mul is cpu_kernels.silu_and_mul  # the layers' CPU path


@needs_kernels
def test_bfloat16_rounding_keeps_denormals_as_torch_does(cpu_isa):
    """Values below 2^-126 round as torch rounds them, not flushed to zero (the one-instruction
    conversion flushes them; vectors holding one take the exact path)."""
    tiny = torch.tensor([1e-39, -3e-39, 5e-40, 1.1e-38] * 8).to(torch.bfloat16)  # denormal
    assert (tiny.float().abs() < 2.0**-126).all() and (tiny != 0).all()
    x = tiny.repeat(3, 1)
    x[1] = _randn(32, dtype=torch.bfloat16, seed=1)  # a row of ordinary values between
    residual = torch.zeros_like(x)
    residual[2, ::2] = tiny[::2] / 2
    _, summed = cpu_kernels.add_rms_norm(x, residual, torch.ones(32, dtype=torch.bfloat16), 1e-6)
    assert torch.equal(summed, x + residual) and (summed[0] != 0).all()
    gate_up = torch.cat([x, torch.ones_like(x)], dim=1)  # silu(tiny) * 1: denormal products
    got = cpu_kernels.silu_and_mul(gate_up)
    assert torch.equal(got, torch_silu_and_mul(gate_up)) and (got[0] != 0).all()


def _rope_case(dtype, tokens, num_heads=4, num_kv_heads=2, head_dim=32):
    qkv = _randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, seed=11)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    rotary = RotaryEmbedding(inv_freq, 4096)
    positions = torch.randint(0, 4096, (tokens,), generator=torch.Generator().manual_seed(3))
    slots = torch.randperm(40 * 16, generator=torch.Generator().manual_seed(4))[:tokens]
    slots[0] = -1  # a padding token: no slot written
    nan = float("nan")
    caches = [torch.full((40, 16, num_kv_heads, head_dim), nan, dtype=dtype) for _ in range(4)]
    return qkv, rotary, positions, slots, caches, (num_heads, num_kv_heads, head_dim)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 64, 300])
# the AVX-512 path (D % 32 == 0), the AVX2 one (D % 16 == 0) and the scalar one
@pytest.mark.parametrize("head_dim", [32, 48, 40])
def test_rope_and_cache_equals_rotary_then_write_kv(dtype, tokens, head_dim, cpu_isa):
    qkv, rotary, positions, slots, caches, (hq, hkv, d) = _rope_case(dtype, tokens,
                                                                     head_dim=head_dim)
    k_cache, v_cache, k_ref, v_ref = caches
    q = cpu_kernels.rope_and_cache(qkv, positions, rotary.cos, rotary.sin, k_cache, v_cache,
                                   slots, hq)  # fmt: skip
    q_in, k_in, v_in = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q_want, k_want = torch_rotary_embedding(positions, q_in.view(-1, hq, d),
                                            k_in.view(-1, hkv, d), rotary.cos, rotary.sin)  # fmt: skip
    live = slots >= 0
    write_kv(k_want[live], v_in.reshape(-1, hkv, d)[live], k_ref, v_ref, slots[live])
    _same(q, q_want)
    # same slots written with the same values; the NaN everywhere else stays NaN
    assert torch.equal(k_cache.isnan(), k_ref.isnan()) and torch.equal(v_cache.isnan(), v_ref.isnan())
    _same(k_cache.nan_to_num(), k_ref.nan_to_num())
    assert torch.equal(v_cache.nan_to_num(), v_ref.nan_to_num())


@needs_kernels
def test_rope_and_cache_rejects_out_of_range_positions_and_slots():
    qkv, rotary, positions, slots, caches, (hq, _, _) = _rope_case(torch.float32, 8)
    positions[3] = 4096  # one past the table
    with pytest.raises(IndexError):
        cpu_kernels.rope_and_cache(qkv, positions, rotary.cos, rotary.sin, caches[0], caches[1],
                                   slots, hq)  # fmt: skip
    positions[3], slots[2] = 0, 40 * 16  # one past the cache
    with pytest.raises(IndexError):
        cpu_kernels.rope_and_cache(qkv, positions, rotary.cos, rotary.sin, caches[0], caches[1],
                                   slots, hq)  # fmt: skip
    # int32 positions: refused (the model runner hands int64)
    with pytest.raises(ValueError, match="int64 positions"):
        cpu_kernels.rope_and_cache(qkv, positions.int(), rotary.cos, rotary.sin, caches[0],
                                   caches[1], slots, hq)  # fmt: skip


needs_bf16_linear = pytest.mark.skipif(
    cpu_kernels.linear_library() is None, reason="no AVX512_BF16 or AVX2 (or no C compiler) here"
)


@pytest.mark.parametrize("dtype,backend", [(torch.float32, "onednn"), (torch.bfloat16, "onednn"),
                                           (torch.bfloat16, "native"), (torch.float32, "native")])  # fmt: skip
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear(dtype, backend, bias, cpu_isa):
    if not cpu_linear.packable(dtype):
        pytest.skip(f"oneDNN cannot pack {dtype} here")
    if backend == "native" and cpu_kernels.pack_f32_linear(torch.ones(1, 2)) is None:
        pytest.skip("no AVX-512 or AVX2 (or no C compiler) here")
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias).to(dtype)  # 200 outputs: a partial panel of 64
    packed = cpu_linear.pack(linear, soberana_kernel=backend == "native")
    assert isinstance(packed, cpu_linear.PackedLinear)
    assert (packed.native is not None) == (backend == "native")
    gots, wants = [], []
    for rows in (1, 2, 3, 5, 7, 13, 64, 300):  # every remainder of the 6-row tiles
        x = _randn(rows, 96, dtype=dtype, seed=rows)
        want = F.linear(x, linear.weight, linear.bias)
        got = packed(x)
        if dtype == torch.float32:  # oneDNN's or soberana's kernel, not MKL's: sums in another order
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        elif backend == "onednn":
            assert torch.equal(got, want)
        gots.append(got.flatten())
        wants.append(want.flatten())
    if dtype != torch.float32 and backend == "native":
        # float32 sums in another order than oneDNN's: a rare one-ulp difference, counted over
        # all 78,200 outputs (one in a 200-output row alone would be 1 in 200)
        _same(torch.cat(gots), torch.cat(wants), exact=False)


@needs_bf16_linear
def test_native_bf16_linear_is_the_same_whatever_the_threads_and_row_layout(cpu_isa):
    if cpu_isa == "avx2":  # the AVX2 + FMA kernel, bfloat16 widened in registers
        assert cpu_kernels.linear_library().linear_bf16_available() == 2
    weight = _randn(200, 64, dtype=torch.bfloat16, seed=1)
    packed = cpu_kernels.pack_bf16_linear(weight)
    wide = _randn(300, 100, dtype=torch.bfloat16, seed=2)
    x = wide[:, 10:74]  # rows 100 elements apart
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.linear_bf16(x, packed, 200, None)
        torch.set_num_threads(max(2, threads))
        many = cpu_kernels.linear_bf16(x, packed, 200, None)
        # one panel, fewer than the threads: the threads share the rows instead
        small = cpu_kernels.pack_bf16_linear(weight[:40])
        rows_shared = cpu_kernels.linear_bf16(x, small, 40, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    assert torch.equal(one, cpu_kernels.linear_bf16(x.contiguous(), packed, 200, None))
    assert torch.equal(rows_shared, one[:, :40])
    _same(one, F.linear(x, weight), exact=False)


@needs_bf16_linear
def test_native_f32_linear_is_the_same_whatever_the_threads_and_row_layout(cpu_isa):
    """The float32 kernel: each output summed by one thread in k order, whatever the threads
    and rows; odd K and a partial panel; against F.linear to float32 rounding."""
    weight = _randn(200, 95, dtype=torch.float32, seed=1)  # K odd, 200 = 3 panels + 8
    bias = _randn(200, dtype=torch.float32, seed=3)
    packed = cpu_kernels.pack_f32_linear(weight)
    padded = torch.nn.functional.pad(bias, (0, -200 % 64))
    wide = _randn(300, 120, dtype=torch.float32, seed=2)
    x = wide[:, 10:105]  # rows 120 elements apart
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.linear_f32(x, packed, 200, padded)
        torch.set_num_threads(max(2, threads))
        many = cpu_kernels.linear_f32(x, packed, 200, padded)
        small = cpu_kernels.pack_f32_linear(weight[:40])  # fewer panels than threads: rows shared
        rows_shared = cpu_kernels.linear_f32(x, small, 40, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    assert torch.equal(one, cpu_kernels.linear_f32(x.contiguous(), packed, 200, padded))
    assert torch.equal(rows_shared + bias[:40], one[:, :40])  # the bias: one add at the end
    torch.testing.assert_close(one, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    for rows in (1, 2, 7, 13):  # one row (its own loop) and the balanced tiles
        assert torch.equal(cpu_kernels.linear_f32(x[:rows], packed, 200, padded), one[:rows])
    with pytest.raises(ValueError, match="columns"):
        cpu_kernels.linear_f32(torch.randn(2, 32), packed, 200, None)
    with pytest.raises(ValueError, match="float32 input"):  # not its dtype: an error
        cpu_kernels.linear_f32(x.bfloat16(), packed, 200, None)


@needs_bf16_linear
def test_native_bf16_linear_declines_what_it_cannot_serve(cpu_isa, monkeypatch):
    odd = nn.Linear(95, 64, bias=False).to(torch.bfloat16)  # K odd: no pairs; oneDNN's instead
    assert cpu_kernels.pack_bf16_linear(odd.weight) is None
    packed = cpu_linear.pack(odd)
    assert packed.native is None and packed.packed is not None
    linear = cpu_linear.pack(nn.Linear(64, 64).to(torch.bfloat16))
    with pytest.raises(ValueError, match="bfloat16 input"):  # float32 rows
        linear(torch.randn(2, 64))
    with pytest.raises(ValueError, match="columns"):
        cpu_kernels.linear_bf16(torch.randn(2, 32).bfloat16(), linear.native, 64, None)
    # a build with neither AVX512_BF16 nor AVX2 (or no compiler): oneDNN's packed matmul
    monkeypatch.setattr(cpu_kernels, "linear_library", lambda: None)
    fallback = cpu_linear.pack(nn.Linear(64, 64).to(torch.bfloat16))
    assert fallback.native is None and fallback.packed is not None


def test_pack_linears_swaps_every_linear():
    if not cpu_linear.packable(torch.float32):
        pytest.skip("oneDNN cannot pack here")
    model = nn.Sequential(nn.Linear(8, 16), nn.Sequential(nn.ReLU(), nn.Linear(16, 4)))
    x = torch.randn(3, 8)
    want = model(x)
    assert cpu_linear.pack_linears(model) == 2
    assert not any(type(m) is nn.Linear for m in model.modules())
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "llama32-tied"])
def test_cpu_models_load_with_packed_projections_and_output_head(arch, tmp_path):
    from soberana.models.loader import load_model
    from tests.engine.tiny_models import build_tiny_model

    if not cpu_linear.packable(torch.float32):
        pytest.skip("oneDNN cannot pack here")
    build_tiny_model(tmp_path, arch)
    model = load_model(tmp_path, torch.float32, torch.device("cpu"), 64).model
    layer = model.layers[0]
    for proj in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.gate_up_proj,
                 layer.down_proj, model.lm_head):  # fmt: skip
        assert isinstance(proj, cpu_linear.PackedLinear)
    hidden = torch.randn(3, model.config.hidden_size)
    # tied or not, the packed head computes hidden @ W^T of the checkpoint's output matrix
    weight = model.embed_tokens.weight if arch == "llama32-tied" else None
    if weight is not None:
        torch.testing.assert_close(model.compute_logits(hidden), F.linear(hidden, weight),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip


def test_keep_freed_memory_is_on_with_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    cpu_kernels.keep_freed_memory.cache_clear()
    assert cpu_kernels.keep_freed_memory() is True


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_argmax_answers_as_torch_does(dtype, cpu_isa):
    torch.manual_seed(0)
    x = torch.randn(12, 3001).to(dtype)
    x[1, 100] = float("nan")  # the first NaN wins, wherever the maximum is
    x[1, 2000] = float("nan")
    x[2, 5] = float("inf")
    x[3] = float("-inf")  # all equal: index 0
    x[4, 7] = x[4, 2999] = 100.0  # ties: the first
    x[5, 0] = float("nan")
    x[6, 3000] = 1000.0  # in the tail past the last 16 columns
    x[7, 17] = x[7, 33] = float("inf")
    got = cpu_kernels.argmax(x)
    assert torch.equal(got, x.argmax(dim=-1))
    for cols in (1, 5, 16, 17, 33):
        y = torch.randn(7, cols).to(dtype)
        assert torch.equal(cpu_kernels.argmax(y), y.argmax(dim=-1))
    rows = torch.randn(6, 4000)[:, :3001].to(dtype)[::2]  # rows apart, unit stride
    assert torch.equal(cpu_kernels.argmax(rows), rows.argmax(dim=-1))
    # columns apart: copied together first, the same answer
    assert torch.equal(cpu_kernels.argmax(x.t()), x.t().argmax(dim=-1))


@needs_bf16_linear
@pytest.mark.parametrize("arch", ["qwen2", "llama32-tied"])  # q/k/v biases; a tied output head
def test_bf16_models_run_on_the_native_linear_as_on_onednn(arch, tmp_path, monkeypatch):
    """A whole bfloat16 model with soberana's linear kernel scores a prompt as it does with
    oneDNN's, to bfloat16 rounding (the two sum in different orders)."""
    from soberana import LLM, SamplingParams
    from tests.engine.tiny_models import build_tiny_model

    build_tiny_model(tmp_path, arch)
    prompt = torch.randint(2, 900, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    scores = {}
    for backend in ("native", "onednn"):
        if backend == "onednn":  # as on a CPU without AVX512_BF16: oneDNN's packed matmul
            monkeypatch.setattr(cpu_kernels, "linear_library", lambda: None)
        llm = LLM(str(tmp_path), dtype="bfloat16", max_model_len=128, kv_cache_gb=0.01)
        head = llm.engine.worker.model.lm_head
        assert (head.native is not None) == (backend == "native")
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        scores[backend] = torch.tensor([d[t].logprob for d, t in
                                        zip(out.prompt_logprobs[1:], prompt[1:])])
        del llm
    assert scores["native"].shape == (39,)
    torch.testing.assert_close(scores["native"], scores["onednn"], rtol=0, atol=0.1)
