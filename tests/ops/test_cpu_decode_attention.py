"""The native CPU decode attention (soberana/ops/csrc/paged_decode_attention.c) against a float32
reference, and how `paged_attention` chooses between it and the PyTorch path.

The pool is poisoned with NaN everywhere a request does not own (paged_attention_cases), and
its blocks are a random permutation, so reading a slot past a context, a block of another
request or the wrong block shows up in the output.
"""

import platform

import pytest
import torch

from soberana.ops import attention, cpu_kernels
from tests.ops.paged_attention_cases import make_step, reference_attention, relative_error

pytestmark = pytest.mark.skipif(
    cpu_kernels._library() is None, reason="no C compiler, or SOBERANA_CPU_KERNELS=0"
)

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
    assert cpu_kernels.paged_decode_attention(
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_result_is_the_same_on_one_or_two_threads_and_either_thread_source(
    dtype, threads, monkeypatch
):
    # Every (sequence, head) is computed by one thread with the same code, so how the work is
    # shared out (and whether torch's OpenMP team or our own pthreads do it) changes no bit.
    step = _step(CONTEXTS * 3, group=2, num_kv_heads=4, dtype=dtype)
    threads(1)
    one = _kernel(step)
    threads(2)
    two = _kernel(step)
    monkeypatch.setattr(cpu_kernels, "_openmp_parallel", lambda: None)
    two_pthreads = _kernel(step)
    assert torch.equal(one, two) and torch.equal(one, two_pthreads)
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_portable_build_gives_the_same_numbers(dtype, monkeypatch):
    step = _step(CONTEXTS, group=2, dtype=dtype)
    native = _kernel(step)
    portable = cpu_kernels.load_library(
        cpu_kernels.compile_library(cpu_kernels.SOURCE, PORTABLE_FLAGS)
    )
    monkeypatch.setattr(cpu_kernels, "_library", lambda: portable)
    out = _kernel(step)
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


def test_layouts_it_cannot_read_are_declined_not_misread():
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
        assert not cpu_kernels.paged_decode_attention(*changed)


def _attend(step):
    return attention.paged_attention(step.q, step.new_keys, step.new_values, step.k_cache,
                                     step.v_cache, step.meta, step.scale)  # fmt: skip


def _count_torch_decodes(monkeypatch) -> list:
    calls = []
    torch_path = attention._decode_attention

    def counted(*args):
        calls.append(args[0].shape[0])
        return torch_path(*args)

    monkeypatch.setattr(attention, "_decode_attention", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_sends_cpu_decodes_to_the_kernel_in_mixed_steps(dtype, monkeypatch):
    calls = _count_torch_decodes(monkeypatch)
    step = make_step([12, 1, 45, 30, 64, 61], [1, 1, 1, 30, 17, 20], num_heads=8,
                     num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype, device="cpu",
                     generator=torch.Generator().manual_seed(0))  # fmt: skip
    out = _attend(step)
    assert calls == []
    assert relative_error(out, reference_attention(step)) < TOLERANCE[dtype]


def test_kernels_off_by_environment_use_the_torch_path(monkeypatch, caplog):
    calls = _count_torch_decodes(monkeypatch)
    step = _step(CONTEXTS, group=2)
    monkeypatch.setenv("SOBERANA_CPU_KERNELS", "0")
    cpu_kernels._library.cache_clear()
    try:
        with caplog.at_level("INFO", logger="soberana.ops"):
            out = _attend(step)
            _attend(step)
    finally:
        cpu_kernels._library.cache_clear()  # later tests load the built library again
    assert calls == [len(CONTEXTS)] * 2
    assert sum("SOBERANA_CPU_KERNELS=0" in r.getMessage() for r in caplog.records) == 1
    assert relative_error(out, reference_attention(step)) < 1e-5


def test_float16_falls_back_when_the_kernel_lacks_it(monkeypatch):
    # A compiler without _Float16 builds the kernel without float16: the call is declined.
    calls = _count_torch_decodes(monkeypatch)
    monkeypatch.setitem(cpu_kernels._DTYPES, torch.float16, 7)  # a dtype code it rejects
    step = _step(CONTEXTS, dtype=torch.float16)
    out = _attend(step)
    assert calls == [len(CONTEXTS)]
    assert relative_error(out, reference_attention(step)) < 1e-3
