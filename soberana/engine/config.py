"""Engine configuration: one dataclass, vLLM's names."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

from soberana.config_flags import flag
from soberana.kv.config import KVWarehouseConfig

DEVICES = "auto, cpu, cuda or cuda:N"
DTYPES = ("auto", "float32", "float16", "bfloat16")
LOAD_FORMATS = ("safetensors", "dummy")
TASKS = ("auto", "generate", "embed", "rerank")
CPU_ISAS = ("native", "avx2", "portable")
# soberana.ops.backend's names, written here too so that parsing flags needs no torch
# (tests/ops/test_backend.py checks the two agree).
COMPUTE_BACKENDS = ("auto", "torch", "native", "triton")
# soberana.quantization's names, written here too so that parsing flags needs no torch
# (tests/server/test_config_flags.py checks the two agree).
QUANTIZATION_CHOICES = ("int8", "int8_w8a16", "int4", "fp8")
KV_CACHE_DTYPE_CHOICES = ("auto", "fp8")


def device_arg(value: str) -> str:
    """`--device`: checked while parsing, so an unsupported device fails at once."""
    if value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", value):
        return value
    raise argparse.ArgumentTypeError(f"unsupported device {value!r}: choose {DEVICES}")


@dataclass
class EngineConfig:
    """Everything the engine core needs to start.

    Each field that is a `soberana serve` flag says so with `flag(default, help)`: the
    command line is generated from these fields (soberana/config_flags.py), and `LLM(**kw)`
    passes its keywords straight here. `kv_cache_gb` sizes the KV pool absolutely; when None
    the pool takes `gpu_memory_utilization` of device memory on GPU, or a share of free RAM on
    CPU.
    """

    model: str | None = flag(
        None, "a local Hugging Face model directory, a .gguf file, a hub id, or 'demo' (random "
        "weights); omit for the default model, SmolLM2-135M-Instruct", positional=True)
    dtype: str = flag("auto", "weight and KV dtype", choices=DTYPES)
    device: str = flag("auto", DEVICES, type=device_arg)
    max_model_len: int | None = flag(None, "context length (default: the model's)")
    kv_cache_gb: float | None = flag(None, "KV cache size in GB")
    gpu_memory_utilization: float = flag(
        0.9, "share of GPU memory the engine may use (weights, KV cache, activations)")
    block_size: int = flag(16, "tokens per KV cache block")
    max_num_seqs: int = flag(256, "most sequences in one engine step (the running batch)")
    max_num_batched_tokens: int = flag(
        8192, "token budget of one engine step (prefill chunks plus decodes)")
    # vLLM's name; leaves room in the step's budget for shorter prompts.
    long_prefill_token_threshold: int = flag(
        0, "a prefill longer than this advances at most this many tokens per step, so shorter "
        "prompts are not held behind it (default 0: no limit)")
    enable_prefix_caching: bool = flag(
        True, "reuse the KV blocks of prompt prefixes already computed")
    seed: int = flag(0, "seed of the engine's random generator")
    # The first --served-model-name (the server's flag, which takes several names).
    served_model_name: str | None = None
    revision: str | None = flag(None, "hub revision of MODEL")
    max_logprobs: int = flag(20, "most logprobs a request may ask for per token")
    enforce_eager: bool = flag(False, "GPU: no CUDA graphs")
    # None: on for CUDA devices, off on CPU (where host and "device" are the same cores).
    async_scheduling: bool | None = flag(
        None, "prepare step N+1 on the host while the device runs step N (default: on for "
        "GPUs)")
    # As vLLM's --load-format dummy.
    load_format: str = flag(
        "safetensors", "dummy: random weights in the model's shape (performance runs without a "
        "checkpoint)", choices=LOAD_FORMATS)
    kv_warehouse: KVWarehouseConfig | None = None  # tiers below the KV pool (soberana/kv)
    task: str = flag(
        "auto", "what the model serves: generate (chat/completions), embed (/v1/embeddings, "
        "/v1/score, /v1/rerank by cosine) or rerank (a cross-encoder: /v1/rerank, /v1/score); "
        "auto follows the checkpoint's architecture (default auto)", choices=TASKS)
    # soberana/ops/backend.py chooses the implementations once, at start, from this.
    compute_backend: str = flag(
        "auto", "which implementations serve the ops, chosen once at start, logged with the "
        "reason for any slower path and shown in /v1/models: triton (GPUs), native (soberana's "
        "C kernels on CPUs), torch (the portable PyTorch path); auto: triton on GPUs, native "
        "on CPUs", choices=COMPUTE_BACKENDS)
    cpu_isa: str = flag(
        "native", "CPU: instruction sets of the native kernels (native: this CPU's; avx2: the "
        "path of CPUs without AVX-512; portable: plain C)", choices=CPU_ISAS)
    # One process per rank (soberana/distributed).
    tensor_parallel_size: int = flag(
        1, "split each layer by heads over this many GPUs (worker processes; gloo on CPUs)")
    # A SpeculativeConfig, a dict or a JSON string.
    speculative_config: object | None = flag(
        None, 'speculative decoding, vLLM\'s JSON: {"method": "ngram", '
        '"num_speculative_tokens": 4} or "draft_model" with "model": PATH, or "layer_skip" '
        '(docs/spec-decode.md)', type=str)
    # vLLM's name; see docs/quantization.md.
    quantization: str | None = flag(
        None, "quantize the weights at load: int8 (on CPUs with AVX512_VNNI or AVX2 the "
        "activations too, per token: W8A8; weight-only elsewhere), int8_w8a16 (weight-only "
        "everywhere), int4 weight-only, fp8 W8A8 (GPUs of compute "
        "capability >= 8.9; weight-only elsewhere). A pre-quantized compressed-tensors "
        "checkpoint is detected without this flag", choices=QUANTIZATION_CHOICES,
        aliases=("-q",))
    # vLLM's name (its GPTQ/AWQ configs read it from a checkpoint's "lm_head" key).
    lm_head_quantized: bool | None = flag(
        None, "quantize the output head (lm_head; a tied one gets its own int8 copy, the "
        "embedding lookup stays exact) with the decoder's linears. Default: on for int8 on CPUs "
        "with the W8A8 kernel, off elsewhere; int8 on CPUs only (docs/quantization.md)")
    kv_cache_dtype: str = flag(
        "auto", "fp8: store keys and values as float8_e4m3fn (twice the tokens in the pool)",
        choices=KV_CACHE_DTYPE_CHOICES)

    def validate(self) -> None:
        """Raise ValueError naming the first setting outside its allowed range."""
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128; got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1; got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1; got {self.max_num_batched_tokens}"
            )
        if self.long_prefill_token_threshold < 0:
            raise ValueError(
                "long_prefill_token_threshold must be >= 0 (0: no limit); got "
                f"{self.long_prefill_token_threshold}"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1; got {self.max_model_len}")
        if self.kv_cache_gb is not None and self.kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb must be > 0; got {self.kv_cache_gb}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1]; got {self.gpu_memory_utilization}"
            )
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be safetensors or dummy; got {self.load_format!r}")
        if self.kv_warehouse is not None and self.kv_warehouse.enabled():
            self.kv_warehouse.validate()
            if not self.enable_prefix_caching:
                raise ValueError("the KV warehouse needs enable_prefix_caching=True")
        if self.task not in TASKS:
            raise ValueError(f"task must be auto, generate, embed or rerank; got {self.task!r}")
        if self.compute_backend not in COMPUTE_BACKENDS:
            raise ValueError(f"compute_backend must be one of {', '.join(COMPUTE_BACKENDS)}; "
                             f"got {self.compute_backend!r}")  # fmt: skip
        if self.cpu_isa not in CPU_ISAS:
            raise ValueError(f"cpu_isa must be native, avx2 or portable; got {self.cpu_isa!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(
                f"tensor_parallel_size must be >= 1; got {self.tensor_parallel_size}")
        if self.speculative_config is not None:
            from soberana.engine.spec_decode.config import SpeculativeConfig

            self.speculative_config = SpeculativeConfig.from_any(self.speculative_config)
        from soberana.quantization import KV_CACHE_DTYPES, QUANTIZATION_METHODS

        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} "
                             f"(or None); got {self.quantization!r}")  # fmt: skip
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; "
                             f"got {self.kv_cache_dtype!r}")  # fmt: skip
        if self.dtype not in DTYPES:
            raise ValueError(
                f"dtype must be auto, float32, float16 or bfloat16; got {self.dtype!r}"
            )
