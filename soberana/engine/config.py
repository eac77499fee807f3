"""Engine configuration: one dataclass, vLLM's names."""

from __future__ import annotations

from dataclasses import dataclass

from soberana.kv.config import KVWarehouseConfig


@dataclass
class EngineConfig:
    """Everything the engine core needs to start.

    `model` is a local Hugging Face directory, a `.gguf` file, a hub id, "demo" (the
    random-weights demo), or None for the default model (SmolLM2-135M-Instruct).
    `kv_cache_gb` sizes the KV pool absolutely; when None the pool takes
    `gpu_memory_utilization` of device memory on GPU, or a share of free RAM on CPU.
    """

    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    kv_cache_gb: float | None = None
    gpu_memory_utilization: float = 0.9
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    # A prefill longer than this advances at most this many tokens per step, leaving room in
    # the step's budget for shorter prompts (vLLM's name); 0: no limit.
    long_prefill_token_threshold: int = 0
    enable_prefix_caching: bool = True
    seed: int = 0
    served_model_name: str | None = None
    revision: str | None = None
    max_logprobs: int = 20
    enforce_eager: bool = False  # GPU: no CUDA graphs
    # Overlap the host's scheduling of step N+1 with the device running step N.
    # None: on for CUDA devices, off on CPU (where host and "device" are the same cores).
    async_scheduling: bool | None = None
    # "safetensors", or "dummy": random weights in the model's shape (performance runs
    # without a checkpoint, as vLLM's --load-format dummy).
    load_format: str = "safetensors"
    kv_warehouse: KVWarehouseConfig | None = None  # tiers below the KV pool (soberana/kv)
    # "generate", "embed" or "rerank"; "auto" follows the checkpoint's architecture.
    task: str = "auto"
    # Which implementations serve the ops, chosen once at start (soberana/ops/backend.py):
    # "auto" (Triton on CUDA, native kernels on CPUs), "triton", "native" or "torch" (the
    # portable PyTorch path). The choice and every slower path taken are logged and shown in
    # /v1/models.
    compute_backend: str = "auto"
    # CPU: the instruction sets the native kernels are built for: "native" (this CPU's),
    # "avx2" (AVX2 + FMA, the path of CPUs without AVX-512) or "portable" (plain C).
    cpu_isa: str = "native"
    # Ranks splitting each layer by heads (soberana/distributed): one process per rank.
    tensor_parallel_size: int = 1
    # Speculative decoding (vLLM's shape): a SpeculativeConfig, a dict or a JSON string.
    speculative_config: object | None = None
    # Weight quantization (vLLM's name): None (the checkpoint's own, if it is pre-quantized),
    # "int8", "int4" or "fp8"; see docs/quantization.md.
    quantization: str | None = None
    # "auto": the model dtype; "fp8": float8_e4m3fn, twice the tokens in the same pool.
    kv_cache_dtype: str = "auto"

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
        if self.load_format not in ("safetensors", "dummy"):
            raise ValueError(f"load_format must be safetensors or dummy; got {self.load_format!r}")
        if self.kv_warehouse is not None and self.kv_warehouse.enabled():
            self.kv_warehouse.validate()
            if not self.enable_prefix_caching:
                raise ValueError("the KV warehouse needs enable_prefix_caching=True")
        if self.task not in ("auto", "generate", "embed", "rerank"):
            raise ValueError(f"task must be auto, generate, embed or rerank; got {self.task!r}")
        from soberana.ops.backend import COMPUTE_BACKENDS

        if self.compute_backend not in COMPUTE_BACKENDS:
            raise ValueError(f"compute_backend must be one of {', '.join(COMPUTE_BACKENDS)}; "
                             f"got {self.compute_backend!r}")  # fmt: skip
        if self.cpu_isa not in ("native", "avx2", "portable"):
            raise ValueError(f"cpu_isa must be native, avx2 or portable; got {self.cpu_isa!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(
                f"tensor_parallel_size must be >= 1; got {self.tensor_parallel_size}")
        if self.tensor_parallel_size > 1 and self.kv_warehouse is not None and (
                self.kv_warehouse.enabled()):
            # Each rank holds only its heads of a block: a warehouse entry would be partial.
            raise ValueError("the KV warehouse is not supported with tensor_parallel_size > 1 "
                             "(docs/distributed.md); disable it or use data parallelism")
        if self.speculative_config is not None:
            from soberana.engine.spec_decode.config import SpeculativeConfig

            if self.tensor_parallel_size > 1:
                raise ValueError("speculative_config is not supported with tensor_parallel_size "
                                 "> 1 yet (docs/spec-decode.md)")

            self.speculative_config = SpeculativeConfig.from_any(self.speculative_config)
        from soberana.quantization import KV_CACHE_DTYPES, QUANTIZATION_METHODS

        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} "
                             f"(or None); got {self.quantization!r}")  # fmt: skip
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; "
                             f"got {self.kv_cache_dtype!r}")  # fmt: skip
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(
                f"dtype must be auto, float32, float16 or bfloat16; got {self.dtype!r}"
            )
