"""The native decoder stack (soberana/ops/cpu/decoder_stack.py, csrc/cpu_forward.c) against the
modules it replaces: the same kernels in the same order, so every step's hidden states and
KV cache are bit-identical. The compute backend gives a model its stack once, at start."""

import gc
import weakref

import pytest
import torch

from soberana import LLM, SamplingParams
from soberana.ops import backend
from soberana.ops.attention import AttentionMetadata
from soberana.ops.cpu import decoder_stack
from tests.engine.tiny_models import build_tiny_model, prompts_of_lengths

pytestmark = pytest.mark.skipif(
    decoder_stack.forward_library() is None,
    reason="no AVX512_BF16 or AVX2 (or no C compiler) here",
)


def _modules(model, x, positions, kv_cache, meta):
    """CausalLM.forward's layer loop, module by module."""
    h, residual = x, None
    for i, layer in enumerate(model.layers):
        h, residual = layer(h, residual, positions, model.rotary, kv_cache[i], meta)
    return model.norm(h, residual)[0]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "llama32-tied", "llama31",
                                  "llama+int8", "qwen2+int8", "llama+int8_w8a16"])
def test_native_stack_matches_the_modules_bit_for_bit_on_every_step(arch, tmp_path, cpu_isa):
    """Chunked prefills next to decodes, a prefix-cache hit, n > 1: each step runs both ways
    on copies of the cache and must agree exactly, hidden states and cache alike. Quantized
    models too: the stack calls each layer's int8 kernel as its module does."""
    arch, _, quantization = arch.partition("+")
    if cpu_isa == "avx2" and (arch not in ("llama", "qwen2") or quantization == "int8_w8a16"):
        pytest.skip("the AVX2 build is checked on two architectures (one with biases)")
    build_tiny_model(tmp_path, arch)
    steps = {"mixed": 0, "decode": 0}
    llm = LLM(str(tmp_path), dtype="bfloat16", max_model_len=256, kv_cache_gb=0.01,
              max_num_batched_tokens=48, max_num_seqs=8, cpu_isa=cpu_isa,
              quantization=quantization or None)  # fmt: skip
    model = llm.engine.worker.model
    native = model.stack
    if quantization:
        kernels = " ".join(llm.engine.model_info.quantization_kernels)
        if "soberana int8" not in kernels:
            pytest.skip(f"no int8 kernel for bfloat16 in the {cpu_isa} build on this CPU")
        assert ("W8A8" in kernels) == (quantization == "int8")
    assert native is not None

    def both(x, positions, kv_cache, meta):
        before, x_before = kv_cache.clone(), x.clone()
        got = native(x, positions, kv_cache, meta)
        assert torch.equal(x, x_before)  # the embeddings are left as they are
        want = _modules(model, x, positions, before, meta)
        assert torch.equal(got, want)
        assert torch.equal(kv_cache, before)
        steps["decode" if meta.num_decodes == len(meta.query_lens_cpu) else "mixed"] += 1
        return got

    model.stack = both
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


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_generation_is_the_same_with_the_stack_on_and_off(tmp_path, quantization):
    """Greedy tokens and their log-probabilities, bfloat16 and int8 (W8A8 where the CPU has
    the kernel): one native call per step gives what the modules give."""
    build_tiny_model(tmp_path, "qwen2")
    prompts = prompts_of_lengths([3, 17, 60, 31])
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2)
    results = {}
    for mode in ("native", "modules"):
        llm = LLM(str(tmp_path), dtype="bfloat16", max_model_len=128, kv_cache_gb=0.01,
                  quantization=quantization)  # fmt: skip
        model = llm.engine.worker.model
        if mode == "modules":  # the same kernels, one Python call each
            model.use_kernels(backend.with_kernels(model.kernels, decoder_stack=None))
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert (model.stack is not None) == (mode == "native")
        results[mode] = [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in d.items()}
                                                   for d in o.outputs[0].logprobs])
                         for o in outs]  # fmt: skip
        del llm
    assert results["native"] == results["modules"]


@pytest.mark.parametrize("case", ["qwen3", "float32", "portable build", "torch backend"])
def test_native_stack_is_not_given_to_what_it_does_not_compute(case, tmp_path):
    """q/k norms (Qwen3), float32, oneDNN's linears (a portable C build has no bf16 linear
    kernel) or the torch backend: the modules run, decided at start."""
    build_tiny_model(tmp_path, "qwen3" if case == "qwen3" else "llama")
    dtype = "float32" if case == "float32" else "bfloat16"
    try:
        llm = LLM(str(tmp_path), dtype=dtype, max_model_len=64, kv_cache_gb=0.01,
                  cpu_isa="portable" if case == "portable build" else "native",
                  compute_backend="torch" if case == "torch backend" else "auto")  # fmt: skip
        out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3,
                                                       ignore_eos=True), use_tqdm=False)[0]  # fmt: skip
        assert len(out.outputs[0].token_ids) == 3
        assert llm.engine.worker.model.stack is None
        kernels = llm.engine.model_info.compute["kernels"]
        assert kernels.get("decoder stack", "modules").startswith("modules")
    finally:
        from soberana.ops.cpu import kernels as cpu_kernels

        cpu_kernels.set_isa("native")


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
        good = model.stack(x, positions, kv_cache, meta)
        assert good.shape == x.shape
        meta.block_table[1, 0] = kv_cache.shape[2]  # a block past the pool
        with pytest.raises(IndexError, match="block_table"):
            model.stack(x, positions, kv_cache, meta)
        meta.block_table[1, 0] = 4
        far = positions.clone()
        far[0] = model.rotary.cos.shape[0]  # past the rotary table
        with pytest.raises(IndexError, match="rotary table"):
            model.stack(x, far, kv_cache, meta)
        # laid out otherwise than the kernels read (int32 positions): an error, not a detour
        with pytest.raises(ValueError, match="int64 positions"):
            model.stack(x, positions.int(), kv_cache, meta)


def test_native_stack_does_not_keep_a_cache_alive(tmp_path):
    """The engine's warm-up runs over a temporary cache: the stack holds it weakly, and keeps
    its weights and workspace for the engine's own cache."""
    build_tiny_model(tmp_path, "llama")
    llm = LLM(str(tmp_path), dtype="bfloat16", max_model_len=64, kv_cache_gb=0.01)
    model, kv_cache = llm.engine.worker.model, llm.engine.worker.kv_cache
    x, positions, meta = _decode_step(model, kv_cache, [5, 20, 33])
    with torch.inference_mode():
        stack = model.stack
        want = stack(x, positions, kv_cache.clone(), meta)
        temporary = kv_cache.clone()
        assert torch.equal(stack(x, positions, temporary, meta), want)
        assert stack.cache() is temporary
        gone = weakref.ref(temporary)
        del temporary
        gc.collect()
        assert gone() is None and stack.cache() is None
        assert torch.equal(stack(x, positions, kv_cache, meta), want)
        assert stack.cache() is kv_cache and model.stack is stack
        # a cache laid out otherwise (float32): an error naming the layout it needs
        with pytest.raises(ValueError, match="contiguous bfloat16 CPU cache"):
            stack(x, positions, kv_cache.float(), meta)



def test_the_c_interface_is_read_from_its_header():
    """csrc/cpu_forward.h defines the structures once; the Python side fills every field of
    each by name and refuses one the header does not have."""
    header = decoder_stack._header()
    assert set(header.structs) == {"Kernels", "Layer", "Model", "Step", "Workspace"}
    assert header.stages["ROPE"] == 3 and header.stages["ATTENTION"] == 4
    layer_fields = [name for name, _ in header.structs["Layer"]._fields_]
    assert layer_fields[:2] == ["input_norm", "post_norm"] and layer_fields[-1] == "v_cache"
    with pytest.raises(TypeError, match="fields"):
        decoder_stack._fill("Step", tokens=1)
