"""The native decoder stack (soberana/ops/cpu_forward.py, csrc/cpu_forward.c) against the
modules it replaces: the same kernels in the same order, so every step's hidden states and
KV cache are bit-identical."""

import gc
import weakref

import pytest
import torch

from soberana import LLM, SamplingParams
from soberana.ops import cpu_forward
from soberana.ops.attention import AttentionMetadata
from tests.engine.tiny_models import build_tiny_model, prompts_of_lengths

pytestmark = pytest.mark.skipif(
    cpu_forward._kernels() is None, reason="no AVX512_BF16 or AVX2 (or no C compiler) here"
)


def _modules(model, x, positions, kv_cache, meta):
    """CausalLM.forward's layer loop, module by module."""
    h, residual = x, None
    for i, layer in enumerate(model.layers):
        h, residual = layer(h, residual, positions, model.rotary, kv_cache[i], meta)
    return model.norm(h, residual)[0]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "llama32-tied", "llama31"])
def test_native_stack_matches_the_modules_bit_for_bit_on_every_step(arch, tmp_path, cpu_isa,
                                                                    monkeypatch):  # fmt: skip
    """Chunked prefills next to decodes, a prefix-cache hit, n > 1: each step runs both ways
    on copies of the cache and must agree exactly, hidden states and cache alike."""
    if cpu_isa == "avx2" and arch not in ("llama", "qwen2"):
        pytest.skip("the AVX2 build is checked on two architectures (one with biases)")
    build_tiny_model(tmp_path, arch)
    native = cpu_forward.forward
    steps = {"mixed": 0, "decode": 0}

    def both(model, x, positions, kv_cache, meta):
        before, x_before = kv_cache.clone(), x.clone()
        got = native(model, x, positions, kv_cache, meta)
        assert got is not None, "the native stack declined a step it serves"
        assert torch.equal(x, x_before)  # the embeddings are left as they are
        want = _modules(model, x, positions, before, meta)
        assert torch.equal(got, want)
        assert torch.equal(kv_cache, before)
        steps["decode" if meta.num_decodes == len(meta.query_lens_cpu) else "mixed"] += 1
        return got

    monkeypatch.setattr(cpu_forward, "forward", both)
    llm = LLM(str(tmp_path), dtype="bfloat16", max_model_len=256, kv_cache_gb=0.01,
              max_num_batched_tokens=48, max_num_seqs=8, cpu_isa=cpu_isa)  # fmt: skip
    prompts = prompts_of_lengths([5, 16, 40, 90, 33, 7])
    prompts.append(prompts[3][:64] + [7, 8, 9])  # four blocks of prompt 3: a prefix hit
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    sampled = llm.generate(prompts[:2], SamplingParams(n=3, temperature=1.0, seed=4,
                                                       max_tokens=6), use_tqdm=False)  # fmt: skip
    assert all(len(o.outputs[0].token_ids) == 12 for o in outs)
    assert all(len(o.outputs) == 3 for o in sampled)
    assert steps["mixed"] >= 3 and steps["decode"] >= 5
    assert llm.engine.kv.prefix_hits >= 64


def test_generation_is_the_same_with_the_stack_on_and_off(tmp_path, monkeypatch):
    build_tiny_model(tmp_path, "qwen2")
    prompts = prompts_of_lengths([3, 17, 60, 31])
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2)
    results = {}
    for mode in ("native", "modules"):
        monkeypatch.setenv("SOBERANA_CPU_FORWARD", mode)
        llm = LLM(str(tmp_path), dtype="bfloat16", max_model_len=128, kv_cache_gb=0.01)
        outs = llm.generate(prompts, params, use_tqdm=False)
        served = cpu_forward.stack_for(llm.engine.worker.model) is not None
        assert served == (mode == "native")
        results[mode] = [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in d.items()}
                                                   for d in o.outputs[0].logprobs])
                         for o in outs]  # fmt: skip
        del llm
    assert results["native"] == results["modules"]


@pytest.mark.parametrize("case", ["qwen3", "float32", "onednn", "switched off"])
def test_native_stack_declines_what_it_does_not_compute(case, tmp_path, monkeypatch):
    """q/k norms (Qwen3), float32, oneDNN's linears or SOBERANA_CPU_FORWARD=modules: the
    modules run, as before."""
    build_tiny_model(tmp_path, "qwen3" if case == "qwen3" else "llama")
    if case == "onednn":
        monkeypatch.setenv("SOBERANA_CPU_LINEAR", "onednn")
    if case == "switched off":
        monkeypatch.setenv("SOBERANA_CPU_FORWARD", "modules")
    dtype = "float32" if case == "float32" else "bfloat16"
    llm = LLM(str(tmp_path), dtype=dtype, max_model_len=64, kv_cache_gb=0.01)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                       use_tqdm=False)[0]  # fmt: skip
    assert len(out.outputs[0].token_ids) == 3
    assert cpu_forward.stack_for(llm.engine.worker.model) is None


def _decode_step(model, kv_cache, seq_lens: list[int]):
    """Embeddings and metadata of one decode step: sequence b's blocks are 4b..4b+3."""
    bs = kv_cache.shape[3]
    table = torch.tensor([[4 * b + j for j in range(4)] for b in range(len(seq_lens))],
                         dtype=torch.int32)  # fmt: skip
    positions = torch.tensor([n - 1 for n in seq_lens])
    slots = torch.tensor([int(table[b, p // bs]) * bs + p % bs for b, p in enumerate(positions)])
    meta = AttentionMetadata(
        slot_mapping=slots, query_start_loc=torch.arange(len(seq_lens) + 1, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_table=table,
        num_decodes=len(seq_lens), query_lens_cpu=[1] * len(seq_lens), seq_lens_cpu=seq_lens,
    )  # fmt: skip
    ids = torch.arange(3, 3 + len(seq_lens))
    return model.embed_tokens(ids), positions, meta


def test_native_stack_raises_on_bad_input_as_the_kernels_do(tmp_path):
    build_tiny_model(tmp_path, "llama")
    llm = LLM(str(tmp_path), dtype="bfloat16", max_model_len=64, kv_cache_gb=0.01)
    model, kv_cache = llm.engine.worker.model, llm.engine.worker.kv_cache
    x, positions, meta = _decode_step(model, kv_cache, [5, 20, 33])
    with torch.inference_mode():
        good = cpu_forward.forward(model, x, positions, kv_cache, meta)
        assert good is not None and good.shape == x.shape
        meta.block_table[1, 0] = kv_cache.shape[2]  # a block past the pool
        with pytest.raises(IndexError, match="block_table"):
            cpu_forward.forward(model, x, positions, kv_cache, meta)
        meta.block_table[1, 0] = 4
        far = positions.clone()
        far[0] = model.rotary.cos.shape[0]  # past the rotary table
        with pytest.raises(IndexError, match="rotary table"):
            cpu_forward.forward(model, x, far, kv_cache, meta)
        # laid out otherwise than the kernels read (int32 positions): the modules' turn
        assert cpu_forward.forward(model, x, positions.int(), kv_cache, meta) is None


def test_native_stack_does_not_keep_a_cache_alive(tmp_path):
    """The engine's warm-up runs over a temporary cache: the stack holds it weakly, and keeps
    its weights and workspace for the engine's own cache."""
    build_tiny_model(tmp_path, "llama")
    llm = LLM(str(tmp_path), dtype="bfloat16", max_model_len=64, kv_cache_gb=0.01)
    model, kv_cache = llm.engine.worker.model, llm.engine.worker.kv_cache
    x, positions, meta = _decode_step(model, kv_cache, [5, 20, 33])
    with torch.inference_mode():
        want = cpu_forward.forward(model, x, positions, kv_cache.clone(), meta)
        temporary = kv_cache.clone()
        assert torch.equal(cpu_forward.forward(model, x, positions, temporary, meta), want)
        stack = cpu_forward.stack_for(model)
        assert stack.cache() is temporary
        gone = weakref.ref(temporary)
        del temporary
        gc.collect()
        assert gone() is None and stack.cache() is None
        assert torch.equal(cpu_forward.forward(model, x, positions, kv_cache, meta), want)
        assert stack.cache() is kv_cache and cpu_forward.stack_for(model) is stack
        # a cache laid out otherwise (float32): declined, the modules run
        assert cpu_forward.forward(model, x, positions, kv_cache.float(), meta) is None

