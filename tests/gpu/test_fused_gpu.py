"""The compiled fused kernels (RMSNorm, add + RMSNorm, rotary, SiLU-and-mul) on a GPU, against
the eager PyTorch chain of `soberana/ops/layers.py` run on the same GPU, at model shapes.

Every case draws fresh random inputs (seed in the failure message) and passes outputs
poisoned with NaN. bfloat16/float16 results must equal torch's up to a flipped rounding
(and be >= 99% bit-identical); float32 within 1e-5 relative; rotary, which has no
reduction, bit for bit in every dtype.
"""

import os

import pytest
import torch

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")

from soberana.ops import layers  # noqa: E402
from soberana.ops.layers import (  # noqa: E402
    torch_rms_norm,
    torch_rotary_embedding,
    torch_silu_and_mul,
)
from soberana.ops.triton.layers import (  # noqa: E402
    fused_add_rms_norm,
    rms_norm,
    rotary_embedding,
    silu_and_mul,
)
from tests.ops.fused_cases import assert_matches, qkv_views, randn, rope_tables  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
TOKENS = [1, 3, 64, 257, 8192]
EPS = 1e-5


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def _nan(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


def _check(out, ref, gen, **kw):
    torch.cuda.synchronize()
    try:
        assert_matches(out, ref, **kw)
    except AssertionError as e:
        raise AssertionError(f"{e} (seed {gen.initial_seed()})") from None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("hidden", [4096, 5120])
def test_rms_norm_and_fused_add_match_torch_at_model_widths(dtype, num_tokens, hidden, gen):
    x, residual = (randn(num_tokens, hidden, dtype=dtype, device="cuda", gen=gen) for _ in "xr")
    weight = randn(hidden, dtype=dtype, device="cuda", gen=gen)
    out = rms_norm(x, weight, EPS, out=_nan(x.shape, dtype))
    _check(out, torch_rms_norm(x, weight, EPS), gen)

    normed, summed = fused_add_rms_norm(
        x, residual, weight, EPS, out=_nan(x.shape, dtype), residual_out=_nan(x.shape, dtype)
    )
    torch.cuda.synchronize()
    assert torch.equal(summed, x + residual), f"seed {gen.initial_seed()}"
    _check(normed, torch_rms_norm(x + residual, weight, EPS), gen)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 64, 4096])
def test_per_head_norm_of_qwen3_qkv_slices_matches_torch(dtype, num_tokens, gen):
    q, k = qkv_views(num_tokens, 32, 8, 128, dtype=dtype, device="cuda", gen=gen)
    weight = randn(128, dtype=dtype, device="cuda", gen=gen)
    for x in (q, k):
        _check(rms_norm(x, weight, EPS, out=_nan(x.shape, dtype)), torch_rms_norm(x, weight, EPS),
               gen)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 5, 257, 4096])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"),
                         [(32, 8, 128), (40, 8, 128), (16, 2, 64)])  # fmt: skip
def test_rotary_matches_torch_on_fused_projection_slices(
    dtype, num_tokens, num_heads, num_kv_heads, head_dim, gen
):
    q, k = qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype=dtype, device="cuda",
                     gen=gen)  # fmt: skip
    cos, sin = rope_tables(head_dim, 32768, "cuda")
    positions = torch.randint(0, 32768, (num_tokens,), generator=gen).cuda()
    q_out, k_out = rotary_embedding(positions, q, k, cos, sin, q_out=_nan(q.shape, dtype),
                                    k_out=_nan(k.shape, dtype))  # fmt: skip
    q_ref, k_ref = torch_rotary_embedding(positions, q, k, cos, sin)
    _check(q_out, q_ref, gen)
    _check(k_out, k_ref, gen)
    # Same operations rounded at the same points as the eager chain (no fma contraction):
    # identical bits, in every dtype.
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref), gen.initial_seed()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 3, 257, 2048])
@pytest.mark.parametrize("inter", [14336, 12288, 1000])
def test_silu_and_mul_matches_torch_at_model_widths(dtype, num_tokens, inter, gen):
    gate_up = randn(num_tokens, 2 * inter, dtype=dtype, device="cuda", gen=gen)
    out = silu_and_mul(gate_up, out=_nan((num_tokens, inter), dtype))
    _check(out, torch_silu_and_mul(gate_up), gen)


def _static_step(n: int, gen):
    """Static inputs for one decoder layer's elementwise ops at n tokens (Llama-3.1-8B shapes)."""
    dt = torch.bfloat16
    s = {
        "x": randn(n, 4096, dtype=dt, device="cuda", gen=gen),
        "res": randn(n, 4096, dtype=dt, device="cuda", gen=gen),
        "w": randn(4096, dtype=dt, device="cuda", gen=gen),
        "qkv": randn(n, 6144, dtype=dt, device="cuda", gen=gen),
        "pos": torch.randint(0, 8192, (n,), generator=gen).cuda(),
        "gate_up": randn(n, 2 * 14336, dtype=dt, device="cuda", gen=gen),
    }
    s["cos"], s["sin"] = rope_tables(128, 8192, "cuda")
    return s


def _layer_ops(s):
    q = s["qkv"][:, :4096].unflatten(1, (32, 128))
    k = s["qkv"][:, 4096:5120].unflatten(1, (8, 128))
    return (
        rms_norm(s["x"], s["w"], EPS),
        *fused_add_rms_norm(s["x"], s["res"], s["w"], EPS),
        *rotary_embedding(s["pos"], q, k, s["cos"], s["sin"]),
        silu_and_mul(s["gate_up"]),
    )


# Zero tokens launch nothing, so that graph is empty, which torch warns about.
@pytest.mark.filterwarnings("ignore:The CUDA Graph is empty")
@pytest.mark.parametrize("num_tokens", [0, 1, 16])
def test_ops_replay_in_a_cuda_graph_on_new_inputs(num_tokens, gen):
    static = _static_step(num_tokens, gen)
    _layer_ops(static)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = _layer_ops(static)
    fresh = _static_step(num_tokens, gen)
    for name in ("x", "res", "w", "qkv", "pos", "gate_up"):
        static[name].copy_(fresh[name])
    graph.replay()
    expected = _layer_ops(fresh)
    torch.cuda.synchronize()
    for got, want in zip(outputs, expected, strict=True):
        assert got.shape == want.shape and torch.equal(got, want), gen.initial_seed()


def _cuda_kernels(fn) -> list[str]:
    fn()  # compile first: the profile should see only the step's own launches
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def test_layers_on_cuda_run_one_fused_kernel_each_and_match_the_torch_path(gen):
    from soberana.ops.backend import select_backend

    s = _static_step(4, gen)
    kernels = select_backend("triton", torch.device("cuda"), torch.bfloat16).kernels
    norm = layers.RMSNorm(4096, EPS).to(device="cuda", dtype=torch.bfloat16)
    norm.weight.data.copy_(s["w"])
    rope = layers.RotaryEmbedding(1.0 / 500000.0 ** (torch.arange(0, 128, 2) / 128), 8192).cuda()
    norm.use_kernels(kernels)
    rope.use_kernels(kernels)
    q = s["qkv"][:, :4096].unflatten(1, (32, 128))
    k = s["qkv"][:, 4096:5120].unflatten(1, (8, 128))
    with torch.inference_mode():
        assert _cuda_kernels(lambda: norm(s["x"])) == ["_rms_norm_kernel"]
        assert _cuda_kernels(lambda: norm(s["x"], s["res"])) == ["_rms_norm_kernel"]
        assert _cuda_kernels(lambda: rope(s["pos"], q, k)) == ["_rotary_kernel"]
        assert _cuda_kernels(lambda: kernels.silu_and_mul(s["gate_up"])) == ["_silu_and_mul_kernel"]
        normed, summed = norm(s["x"], s["res"])
        q_rot, k_rot = rope(s["pos"], q, k)
        act = kernels.silu_and_mul(s["gate_up"])
    assert torch.equal(summed, s["x"] + s["res"])
    _check(normed, torch_rms_norm(s["x"] + s["res"], norm.weight, EPS), gen)
    q_ref, k_ref = torch_rotary_embedding(s["pos"], q, k, rope.cos, rope.sin)
    assert torch.equal(q_rot, q_ref) and torch.equal(k_rot, k_ref)
    _check(act, torch_silu_and_mul(s["gate_up"]), gen)
