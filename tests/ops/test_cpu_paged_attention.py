"""The native CPU paged attention (soberana/ops/csrc/paged_attention.c), decodes and prefills,
against a float32 reference, and the step attention the native backend hands the layers.

The pool is poisoned with NaN everywhere a request does not own (paged_attention_cases), and
its blocks are a random permutation, so reading a slot past a context, a block of another
request or the wrong block shows up in the output.
"""

import platform

import pytest
import torch

from soberana.ops import attention
from soberana.ops.cpu import kernels as cpu_kernels
from tests.ops.paged_attention_cases import make_step, reference_attention, relative_error

pytestmark = [
    pytest.mark.skipif(
        cpu_kernels.attention_library() is None, reason="no C compiler here"
    ),
    pytest.mark.usefixtures("cpu_isa"),  # each build: this CPU's, and AVX2 on an AVX-512 CPU
]

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}
# Ragged: one token, exactly one and two blocks, a block plus one, many blocks, ~1000.
CONTEXTS = [1, 16, 32, 33, 300, 5, 1000, 64, 129]
# A portable build: no -march=native, so no AVX-512 whatever this machine has.
PORTABLE_FLAGS = ("-O3", "-march=x86-64", "-fPIC", "-shared", "-pthread")


@pytest.fixture
def threads():
    """Set torch's thread count (the kernel's) for one test."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _step(contexts, *, group=1, num_kv_heads=2, head_dim=64, block_size=16,
          dtype=torch.float32, seed=0):  # fmt: skip
    return make_step(
        contexts, [1] * len(contexts), num_heads=group * num_kv_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size, dtype=dtype,
        device="cpu", generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip


def _kernel(step, q=None):
    q = step.q if q is None else q
    out = torch.empty(q.shape, dtype=q.dtype)
    cpu_kernels.paged_attention(
        q, step.k_cache, step.v_cache, step.block_table, step.seq_lens, step.scale, out
    )
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_matches_reference_on_ragged_contexts(dtype, group, head_dim, block_size):
    step = _step(CONTEXTS, group=group, head_dim=head_dim, block_size=block_size, dtype=dtype)
    out = _kernel(step)
    assert relative_error(out, reference_attention(step)) < TOLERANCE[dtype]


@pytest.mark.parametrize("head_dim", [40, 80, 8])
def test_head_dims_off_the_vector_width_match_reference(head_dim):
    # Not a multiple of 16 (the portable path), and multiples of 16 but not of 32.
    for dtype in (torch.float32, torch.bfloat16):
        step = _step(CONTEXTS, group=2, head_dim=head_dim, dtype=dtype)
        assert relative_error(_kernel(step), reference_attention(step)) < TOLERANCE[dtype]


@pytest.mark.parametrize("kind", ["decode", "prefill"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_result_is_the_same_on_one_or_two_threads_and_either_thread_source(
    kind, dtype, threads, monkeypatch
):
    # Every work item is computed by one thread with the same code, so how the work is shared
    # out (and whether torch's OpenMP team or our own pthreads do it) changes no bit.
    if kind == "decode":
        step, run = _step(CONTEXTS * 3, group=2, num_kv_heads=4, dtype=dtype), _kernel
    else:
        step, run = _prefill(PREFILLS * 2, group=2, num_kv_heads=4, dtype=dtype), _prefill_kernel
    threads(1)
    one = run(step)
    threads(2)
    two = run(step)
    monkeypatch.setattr(cpu_kernels, "openmp_parallel", lambda: None)
    assert torch.equal(one, two) and torch.equal(one, run(step))
    assert relative_error(one, reference_attention(step)) < TOLERANCE[dtype]


def test_a_single_long_sequence_splits_its_heads_over_threads(threads):
    step = _step([1000], group=1, num_kv_heads=8)
    threads(2)
    assert relative_error(_kernel(step), reference_attention(step)) < 1e-5


def test_slots_past_a_context_and_unused_table_entries_are_never_read():
    step = _step([70, 5, 33, 16], block_size=16)
    for i, ctx in enumerate(step.seq_lens.tolist()):
        step.block_table[i, -(-ctx // 16) :] = -1  # not even a valid block id
    assert relative_error(_kernel(step), reference_attention(step)) < 1e-5


def test_a_zero_length_context_gives_zeros():
    # Batch padding: a query row with nothing to attend to (make_step's convention).
    step = make_step(
        [0, 40],
        [1, 1],
        num_heads=2,
        num_kv_heads=2,
        head_dim=64,
        block_size=16,
        dtype=torch.float32,
        device="cpu",
        generator=torch.Generator().manual_seed(0),
    )
    out = _kernel(step)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert relative_error(out, reference_attention(step)) < 1e-5


def test_query_rows_may_be_a_strided_slice_of_the_fused_qkv():
    step = _step(CONTEXTS, group=2)
    num_tokens, num_heads, head_dim = step.q.shape
    qkv = torch.randn(num_tokens, (num_heads + 4) * head_dim)
    qkv[:, : num_heads * head_dim] = step.q.reshape(num_tokens, -1)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    assert not q.is_contiguous()
    assert torch.equal(_kernel(step, q), _kernel(step))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 flags")
@pytest.mark.parametrize("kind", ["decode", "prefill"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_portable_build_gives_the_same_numbers(kind, dtype, monkeypatch):
    if kind == "decode":
        step, run = _step(CONTEXTS, group=2, dtype=dtype), _kernel
    else:
        step, run = _prefill(group=2, dtype=dtype), _prefill_kernel
    native = run(step)
    portable = cpu_kernels.load_library(
        cpu_kernels.compile_library(cpu_kernels.SOURCE, PORTABLE_FLAGS)
    )
    monkeypatch.setattr(cpu_kernels, "attention_library", lambda: portable)
    out = run(step)
    assert relative_error(out, reference_attention(step)) < TOLERANCE[dtype]
    assert relative_error(out, native) < TOLERANCE[dtype]


def test_a_block_id_outside_the_pool_raises_index_error():
    step = _step([40, 20])
    step.block_table[1, 0] = step.k_cache.shape[0]
    with pytest.raises(IndexError, match="block_table"):
        _kernel(step)


def test_a_context_longer_than_its_block_table_raises_index_error():
    step = _step([40, 20])
    step.seq_lens[0] = step.block_table.shape[1] * 16 + 1
    with pytest.raises(IndexError, match="block_table"):
        _kernel(step)


def test_layouts_it_cannot_read_are_refused_not_misread():
    step = _step([40, 20])
    out = torch.empty_like(step.q)
    args = [step.q, step.k_cache, step.v_cache, step.block_table, step.seq_lens, step.scale, out]
    wrong = {
        0: step.q.transpose(0, 1).contiguous().transpose(0, 1),  # heads not contiguous
        1: step.k_cache.transpose(1, 2).contiguous().transpose(1, 2),
        3: step.block_table.long(),
        6: torch.empty(out.shape, dtype=torch.float64),
    }
    for i, value in wrong.items():
        changed = list(args)
        changed[i] = value
        with pytest.raises(ValueError, match="paged_attention"):
            cpu_kernels.paged_attention(*changed)


def _attend(step):
    return cpu_kernels.paged_attention_step(step.q, step.new_keys, step.new_values,
                                            step.k_cache, step.v_cache, step.meta, step.scale)  # fmt: skip


def _count_torch_decodes(monkeypatch) -> list:
    calls = []
    torch_path = attention._decode_attention

    def counted(*args):
        calls.append(args[0].shape[0])
        return torch_path(*args)

    monkeypatch.setattr(attention, "_decode_attention", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_step_attention_sends_decodes_to_the_kernel_in_mixed_steps(dtype, monkeypatch):
    calls = _count_torch_decodes(monkeypatch)
    step = make_step([12, 1, 45, 30, 64, 61], [1, 1, 1, 30, 17, 20], num_heads=8,
                     num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype, device="cpu",
                     generator=torch.Generator().manual_seed(0))  # fmt: skip
    out = _attend(step)
    assert calls == []
    assert relative_error(out, reference_attention(step)) < TOLERANCE[dtype]


def test_the_torch_backend_attends_on_the_pytorch_path(monkeypatch):
    from soberana.ops.backend import select_backend

    calls = _count_torch_decodes(monkeypatch)
    step = _step(CONTEXTS, group=2)
    torch_attention = select_backend("torch", torch.device("cpu"), torch.float32).kernels
    out = torch_attention.paged_attention(step.q, step.new_keys, step.new_values, step.k_cache,
                                          step.v_cache, step.meta, step.scale)  # fmt: skip
    assert calls == [len(CONTEXTS)]
    assert relative_error(out, reference_attention(step)) < 1e-5


def test_a_dtype_the_build_lacks_is_an_error_not_a_detour(monkeypatch):
    # A compiler without _Float16 builds the kernel without float16: the call says so.
    calls = _count_torch_decodes(monkeypatch)
    monkeypatch.setitem(cpu_kernels.DTYPES, torch.float16, 7)  # a dtype code it rejects
    step = _step(CONTEXTS, dtype=torch.float16)
    with pytest.raises(ValueError, match="unsupported by this build"):
        _attend(step)
    assert calls == []


# ---- prefills: several queries per sequence (query_start), causal over any cached prefix ----

# (keys, new queries) per sequence: a fresh prompt shorter than a block, exactly one block,
# a block plus one, a cached prefix with a short chunk, a long chunk after a long prefix (more
# than one chunk of keys and more than one item of queries), and one-query sequences (a decode
# inside the call, and a chunk of one token).
PREFILLS = [(5, 5), (16, 16), (17, 17), (70, 9), (1000, 300), (41, 1), (129, 128), (64, 1)]


def _prefill(prefills=PREFILLS, *, group=1, num_kv_heads=2, head_dim=64, block_size=16,
             dtype=torch.float32, seed=0):  # fmt: skip
    contexts, queries = zip(*prefills, strict=True)
    return make_step(
        list(contexts), list(queries), num_heads=group * num_kv_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size, dtype=dtype,
        device="cpu", generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip


def _prefill_kernel(step, q=None):
    q = step.q if q is None else q
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)  # every row must be written
    cpu_kernels.paged_attention(q, step.k_cache, step.v_cache, step.block_table,
                                step.seq_lens, step.scale, out, step.query_start_loc)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_prefill_matches_reference(dtype, group, head_dim, block_size):
    step = _prefill(group=group, head_dim=head_dim, block_size=block_size, dtype=dtype)
    assert relative_error(_prefill_kernel(step), reference_attention(step)) < TOLERANCE[dtype]


@pytest.mark.parametrize("head_dim", [40, 80, 8])
@pytest.mark.parametrize("block_size", [8, 48, 256])
def test_prefill_odd_head_dims_and_block_sizes_match_reference(head_dim, block_size):
    # Head dims off the 32-column bfloat16 layout (and off the vector width: the portable
    # path); blocks that do not divide a chunk of keys into groups of 16, or exceed one.
    for dtype in (torch.float32, torch.bfloat16):
        step = _prefill(group=2, head_dim=head_dim, block_size=block_size, dtype=dtype)
        out = _prefill_kernel(step)
        assert relative_error(out, reference_attention(step)) < TOLERANCE[dtype]


def test_each_query_sees_only_the_keys_before_it():
    # A key after a query that is huge would dominate that query's softmax if it were read.
    step = _prefill([(40, 40)], dtype=torch.float32)
    k_new = step.k_cache.clone()
    block = int(step.block_table[0, 2])
    k_new[block, 7] = 1e4  # key 39, every head
    out = torch.empty_like(step.q)
    cpu_kernels.paged_attention(step.q, k_new, step.v_cache, step.block_table,
                                step.seq_lens, step.scale, out, step.query_start_loc)
    ref = _prefill_kernel(step)
    assert torch.equal(out[:39], ref[:39])  # queries 0-38 never see key 39
    assert not torch.equal(out[39], ref[39])


def test_prefill_decodes_in_the_same_call_match_a_decode_call():
    step = _prefill()
    out = _prefill_kernel(step)
    decodes = [i for i, (_, n) in enumerate(PREFILLS) if n == 1]
    rows = step.query_start_loc[decodes].long()
    alone = torch.empty(len(decodes), *step.q.shape[1:])
    cpu_kernels.paged_attention(step.q[rows], step.k_cache, step.v_cache,
                                step.block_table[decodes].contiguous(),
                                step.seq_lens[decodes].contiguous(), step.scale, alone)
    assert torch.equal(out[rows], alone)


def test_prefill_query_rows_may_be_a_strided_slice_of_the_fused_qkv():
    step = _prefill(group=2)
    num_tokens, num_heads, head_dim = step.q.shape
    qkv = torch.randn(num_tokens, (num_heads + 4) * head_dim)
    qkv[:, : num_heads * head_dim] = step.q.reshape(num_tokens, -1)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    assert torch.equal(_prefill_kernel(step, q), _prefill_kernel(step))


def test_more_queries_than_keys_raise_value_error():
    step = _prefill([(40, 40), (20, 10)])
    step.seq_lens[1] = 9
    with pytest.raises(ValueError, match="query_start"):
        _prefill_kernel(step)


def test_a_prefill_block_outside_the_pool_raises_index_error():
    step = _prefill([(40, 40), (20, 10)])
    step.block_table[1, 1] = -1
    with pytest.raises(IndexError, match="block_table"):
        _prefill_kernel(step)


def test_query_start_it_cannot_read_is_refused():
    step = _prefill([(40, 40), (20, 10)])
    out = torch.empty_like(step.q)
    args = [step.q, step.k_cache, step.v_cache, step.block_table, step.seq_lens, step.scale, out]
    for wrong in (step.query_start_loc.long(), step.query_start_loc + 1000):
        with pytest.raises(ValueError, match="paged_attention"):
            cpu_kernels.paged_attention(*args, wrong)


def test_native_step_attention_sends_prefills_to_the_kernel(monkeypatch):
    sdpa = []
    monkeypatch.setattr(attention, "_prefill_attention", lambda *a: sdpa.append(a))
    step = _prefill(group=2, dtype=torch.bfloat16)
    out = cpu_kernels.paged_attention_step(step.q, None, None, step.k_cache, step.v_cache,
                                           step.meta, step.scale)  # fmt: skip
    assert sdpa == []
    assert relative_error(out, reference_attention(step)) < TOLERANCE[torch.bfloat16]


def test_each_build_takes_its_vector_path(cpu_isa):
    """The build for "avx2" runs the AVX2 + FMA path (not plain C), and "native" the widest this
    CPU has, so the numbers the other tests check are those of that path."""
    level = cpu_kernels.attention_library().simd_level()
    flags = cpu_kernels.cpu_flags()
    if cpu_isa == "avx2" or (platform.machine() == "x86_64" and "avx512f" not in flags
                             and {"avx2", "fma", "f16c"} <= flags):  # fmt: skip
        assert level == 1
    elif "avx512f" in flags:
        assert level == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keys_far_below_a_dominant_one_weigh_nothing(dtype):
    """An attention sink: each sequence's first key scores ~150 above the rest, so their
    exp(score - max) is below float32's smallest normal (vec_exp gives 0 there, not a
    subnormal). Decodes and prefills still match the float32 reference."""
    for step in (_step(CONTEXTS, group=2, dtype=dtype), _prefill(group=2, dtype=dtype)):
        u = torch.randn(64, generator=torch.Generator().manual_seed(5))
        u /= u.norm()
        step.q += (12 * u).to(dtype)
        for b, keys in enumerate(step.keys):  # 12 * 100 / sqrt(64) = 150; the others q . k ~ 0
            keys[0] = (100 * u).to(dtype)
            step.k_cache[int(step.block_table[b, 0]), 0] = keys[0]
        scores = (step.q.float() @ (100 * u).to(dtype).float()) * step.scale
        assert (scores > 100).all()  # every query's other keys: weights below 2^-126
        out = _kernel(step) if step.max_query_len == 1 else _prefill_kernel(step)
        assert relative_error(out, reference_attention(step)) < TOLERANCE[dtype]
