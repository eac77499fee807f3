"""The device side of an engine (vLLM's Worker): device and dtype, the model's weights, the KV
pool sized from a profiling forward, CUDA graph capture and the CPU warm-up.

`EngineCore` builds one in three phases and then only schedules:

    worker = Worker(config)          # device, dtype, model path and context length chosen
    worker.load_model()              # weights (or the tensor-parallel ranks) on the device
    worker.initialize_kv_cache()     # profiling forward -> pool size -> pool, KV layout
    worker.compile_or_warm_up()      # CUDA graphs on a GPU, a few warm-up shapes on a CPU
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from soberana.engine.config import EngineConfig
from soberana.engine.cuda_graphs import DecodeGraphs
from soberana.engine.verify_graphs import VerifyGraphs
from soberana.kv.layout import KVLayout
from soberana.models.config import ModelConfig
from soberana.models.loader import load_model, read_model_config, resolve_model_path
from soberana.ops.attention import AttentionMetadata
from soberana.ops.backend import Backend, select_backend
from soberana.ops.cpu import kernels as cpu_kernels
from soberana.quantization import gguf_quantization, resolve_quantization, with_lm_head

log = logging.getLogger("soberana.engine")

_CPU_DEFAULT_KV_GB = 4.0
# CPU: the pool holds this many tokens by default (or max_model_len, if longer): a CPU's
# throughput saturates at a few dozen sequences, and zeroing an unused pool costs start-up.
_CPU_DEFAULT_KV_TOKENS = 16384
_WARM_UP_PROMPT = 128
_WARM_UP_DECODE_ROWS = 8


def resolve_device(device: str) -> torch.device:
    """`auto`: the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV pool's dtype: the model's (`auto`) or float8_e4m3fn (`fp8`)."""
    return torch.float8_e4m3fn if kv_cache_dtype == "fp8" else model_dtype


def resolve_dtype(dtype: str, checkpoint_dtype: str | None, device: torch.device,
                  cpu_isa: str = "native") -> torch.dtype:  # fmt: skip
    """`auto`: bfloat16 on GPUs; on CPU bfloat16 for a bfloat16 checkpoint where the CPU has
    native bfloat16 matmuls (AVX512_BF16 or AMX), else float32 (emulated bfloat16 and float16
    matmuls are slower than float32 on CPUs; `cpu_isa` other than native builds no AVX-512)."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16
    if checkpoint_dtype == "bfloat16":
        if cpu_kernels.native_bf16_matmul(cpu_isa):
            return torch.bfloat16
        log.info("dtype auto: float32 (the checkpoint is bfloat16, but this CPU or the chosen "
                 "cpu_isa has no native bfloat16 matmul: no avx512_bf16/amx_bf16)")
    return torch.float32


def max_model_len(config: EngineConfig, mcfg: ModelConfig) -> int:
    """The context length served: `config.max_model_len`, within the model's own limit."""
    limit = mcfg.max_position_embeddings
    if mcfg.sliding_window is not None and mcfg.sliding_window < limit:
        # Attention here is full; within the window full and sliding attention agree.
        log.warning("sliding window %d: max_model_len limited to it", mcfg.sliding_window)
        limit = mcfg.sliding_window
    if config.max_model_len is None:
        return limit
    if config.max_model_len > limit:
        raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's limit of {limit}")
    return config.max_model_len


def num_kv_blocks(config: EngineConfig, device: torch.device, bytes_per_block: int,
                  max_len: int, activation_bytes: int) -> int:
    """How many KV blocks the pool gets: `kv_cache_gb` when given; on a GPU what keeps the
    card under `gpu_memory_utilization` after the profiled activations; on a CPU by need."""
    if config.kv_cache_gb is not None:
        return int(config.kv_cache_gb * 1e9) // bytes_per_block
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # `free` is the card's, so memory held by other processes (another engine, a
        # notebook) already counts against the budget: after the pool, this process plus
        # everyone else stays under gpu_memory_utilization of the card. Keep the profiled
        # activations and ~1 GiB for CUDA graphs and the sampler.
        budget = free - (1 - config.gpu_memory_utilization) * total - activation_bytes - 2**30
        others = max(0, total - free - torch.cuda.memory_reserved(device))
        log.info(
            "KV pool: %.2f GiB, so the card stays under %.0f%% of %.1f GiB; %.2f GiB of it "
            "is outside this process's allocator (other processes, CUDA contexts)",
            max(0, budget) / 2**30, 100 * config.gpu_memory_utilization, total / 2**30,
            others / 2**30,
        )
        return max(0, int(budget)) // bytes_per_block
    # CPU: by need: max(max_model_len, _CPU_DEFAULT_KV_TOKENS) tokens, no more than every
    # sequence at full length, within 4 GB and 20% of free RAM (kv_cache_gb for more).
    useful = config.max_num_seqs * max_len / config.block_size * bytes_per_block
    need = max(max_len, _CPU_DEFAULT_KV_TOKENS) / config.block_size * bytes_per_block
    budget = min(_CPU_DEFAULT_KV_GB * 1e9, 0.2 * _available_ram(), useful, need)
    return max(int(budget) // bytes_per_block, -(-max_len // config.block_size))


class Worker:
    """Owns the model on its device and the KV pool it reads and writes."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        # Allocator tuning is process-wide: the entry points opt in (engine/process_memory.py).
        t0 = time.perf_counter()
        self.path = resolve_model_path(config.model, config.revision)
        mcfg, _ = read_model_config(self.path)
        self.model_config: ModelConfig = mcfg  # the loaded model's (one rank's, under TP)
        self.dtype = resolve_dtype(config.dtype, mcfg.torch_dtype, self.device, config.cpu_isa)
        # The implementations serving every op, chosen once and logged (ops/backend.py); the
        # model's layers hold them from load on.
        self.backend: Backend = select_backend(
            config.compute_backend, self.device, self.dtype,
            kv_cache_torch_dtype(config.kv_cache_dtype, self.dtype), config.cpu_isa)
        self.max_model_len = max_model_len(config, mcfg)
        if self.path.is_file():  # GGUF: no config.json; dequantized, or re-packed at load
            from soberana.models.gguf import linear_types, open_gguf

            self.quantization = gguf_quantization(config.quantization,
                                                  linear_types(open_gguf(self.path)))  # fmt: skip
        else:
            hf_config = json.loads((self.path / "config.json").read_text())
            self.quantization = resolve_quantization(config.quantization, hf_config)
        self.quantization = with_lm_head(self.quantization, config.lm_head_quantized)
        self.tp = None  # tensor parallel: the workers and rank 0's group (soberana/distributed)
        self.model: nn.Module | None = None
        self.weights_fingerprint = ""  # the weights' identity (LoadedModel.fingerprint)
        self.num_blocks = 0
        self.kv_cache: torch.Tensor | None = None
        self.layout: KVLayout | None = None  # names every block: its fingerprint seeds the hashes
        self.graphs: DecodeGraphs | None = None
        self.verify_graphs: VerifyGraphs | None = None
        # Seconds per start-up phase, for the "engine ready" line and benchmarks.
        self.startup: dict[str, float] = {"find_model_s": time.perf_counter() - t0}

    # ---- phases -----------------------------------------------------------------------------

    def load_model(self) -> None:
        """The weights on the device (one shard per rank under tensor parallelism)."""
        t0 = time.perf_counter()
        config = self.config
        if config.tensor_parallel_size > 1:
            from soberana.distributed.executor import TensorParallel

            self.tp = TensorParallel(config, self.path, self.dtype, self.device, self.max_model_len,
                                     self.backend, self.quantization)
            loaded = self.tp.loaded
        else:
            loaded = load_model(self.path, self.dtype, self.device, self.max_model_len,
                                config.load_format, self.quantization, self.backend)
        self.model = loaded.model
        self.model_config = loaded.config
        self.quantization = loaded.quantization  # as resolved for the device (its output head)
        self.weights_fingerprint = loaded.fingerprint
        self.startup["model_s"] = time.perf_counter() - t0

    def initialize_kv_cache(self) -> None:
        """Size the pool (after a profiling forward on a GPU), allocate it, and name its layout."""
        t0 = time.perf_counter()
        config, mcfg = self.config, self.model_config
        block_size = config.block_size
        kv_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, self.dtype)
        if kv_dtype != self.dtype and self.device.type == "cuda":
            # The Triton FP8 cache path passes in Triton's interpreter and its kernel tests on
            # an H100, but the engine test has not passed on a GPU yet (its last run, session
            # 14, found the PyTorch path attending a fresh prompt's unrounded keys while Triton
            # reads them rounded, since fixed in ops/attention.py, not re-run): refused until
            # tests/gpu/test_fp8_kv_gpu.py passes whole, rather than served unverified.
            raise ValueError("kv_cache_dtype fp8 is supported on CPUs only in this version (the "
                             "GPU path has not passed its GPU tests yet). Use --kv-cache-dtype "
                             "auto on GPUs.")  # fmt: skip
        # Under tensor parallelism a block is named (and stored in the warehouse) whole: every
        # KV head of the model, with the rank count in its fingerprint; each rank's pool holds
        # its own heads of it (docs/distributed.md).
        tp = config.tensor_parallel_size
        layout = KVLayout(model_fingerprint=self.weights_fingerprint,
                          dtype=str(kv_dtype).removeprefix("torch."), block_size=block_size,
                          num_layers=mcfg.num_layers, head_dim=mcfg.head_dim,
                          num_kv_heads=self.tp.model.num_kv_heads if tp > 1 else mcfg.num_kv_heads,
                          tensor_parallel_size=tp)
        bytes_per_block = layout.block_nbytes // layout.num_kv_heads * mcfg.num_kv_heads
        activation_bytes = self._profile_forward()
        num_blocks = num_kv_blocks(config, self.device, bytes_per_block, self.max_model_len,
                                   activation_bytes)
        if num_blocks < 1:
            raise ValueError("the KV cache is too small for a single block; raise kv_cache_gb")
        if self.max_model_len > num_blocks * block_size:
            log.warning("max_model_len %d exceeds the KV pool (%d tokens); capping it",
                        self.max_model_len, num_blocks * block_size)
            self.max_model_len = num_blocks * block_size
        kv_shape = (mcfg.num_layers, 2, num_blocks, block_size, mcfg.num_kv_heads, mcfg.head_dim)
        if self.device.type == "cpu":
            self.kv_cache = _zeros_lazily(kv_shape, kv_dtype)
        else:
            self.kv_cache = torch.zeros(kv_shape, dtype=kv_dtype, device=self.device)
        if self.tp is not None:  # each rank's pool: the same blocks, its own KV heads
            self.tp.model.share_kv_cache(self.kv_cache)
        self.num_blocks = num_blocks
        self.layout = layout
        log.info("KV cache: %d blocks x %d tokens = %d tokens (%.2f GB, %s)", num_blocks,
                 block_size, num_blocks * block_size, num_blocks * bytes_per_block / 1e9,
                 kv_dtype)  # fmt: skip
        self.startup["kv_alloc_s"] = time.perf_counter() - t0

    def compile_or_warm_up(self) -> None:
        """GPU: capture the decode CUDA graphs (unless eager). CPU: run a few representative
        shapes so the first request pays neither the kernels' build nor the heap's growth."""
        config = self.config
        if (self.device.type == "cuda" and not config.enforce_eager
                and self.backend.name == "triton"
                and self.tp is None):  # graphs with collectives: not built yet (docs/distributed.md)
            self.graphs = DecodeGraphs(self.model, self.kv_cache, config.max_num_seqs,
                                       -(-self.max_model_len // config.block_size), self.device)
            self.startup["graphs_s"] = self.graphs.capture()
            spec = config.speculative_config
            if spec is not None:  # the verification steps of speculative decoding
                self.verify_graphs = VerifyGraphs(
                    self.model, self.kv_cache, spec.num_speculative_tokens, config.max_num_seqs,
                    spec.disable_by_batch_size, self.graphs.block_table.shape[1], self.device)
                self.startup["graphs_s"] += self.verify_graphs.capture(self.graphs.pool)
        if self.device.type == "cpu":
            self.startup["warm_up_s"] = self._warm_up_cpu()

    # ---- forwards outside the step loop -----------------------------------------------------

    def dummy_forward(self, tokens: int, seqs: int = 1) -> Callable[[], torch.Tensor]:
        """A forward of `seqs` prompts of `tokens` each over a temporary KV cache (profiling,
        warm-up, calibration); returns a callable giving the final hidden states."""
        mcfg = self.model_config
        dtype = kv_cache_torch_dtype(self.config.kv_cache_dtype, self.dtype)
        bs = self.config.block_size
        per_seq = -(-tokens // bs)
        nblocks, total = per_seq * seqs, tokens * seqs
        dev = self.device
        tmp = torch.zeros(mcfg.num_layers, 2, nblocks, bs, mcfg.num_kv_heads, mcfg.head_dim,
                          dtype=dtype, device=dev)
        table = torch.arange(nblocks, dtype=torch.int32, device=dev).view(seqs, per_seq)
        pos = torch.arange(tokens, device=dev).repeat(seqs)
        meta = AttentionMetadata(
            slot_mapping=(table.long()[:, :, None] * bs
                          + torch.arange(bs, device=dev)).view(seqs, -1)[:, :tokens].flatten().contiguous(),
            query_start_loc=torch.arange(0, total + 1, tokens, dtype=torch.int32, device=dev),
            seq_lens=torch.full((seqs,), tokens, dtype=torch.int32, device=dev),
            block_table=table, num_decodes=seqs if tokens == 1 else 0,
            query_lens_cpu=[tokens] * seqs,
            seq_lens_cpu=[tokens] * seqs,
        )  # fmt: skip
        ids = torch.zeros(total, dtype=torch.long, device=dev)
        model = self.model
        return lambda: model(ids, pos, tmp, meta)

    @torch.inference_mode()
    def prefill_tokens_per_s(self) -> float:
        """Measured prefill rate of one 512-token sequence (the warehouse's load-or-recompute
        choice)."""
        tokens = min(512, self.max_model_len, self.config.max_num_batched_tokens)
        run = self.dummy_forward(tokens)
        seconds = []
        for _ in range(3):
            t = time.perf_counter()
            run()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds.append(time.perf_counter() - t)
        return tokens / min(seconds[1:])

    def load_draft_model(self, model: str) -> nn.Module:
        """A speculative-decoding draft model, in this worker's dtype, device and context."""
        path = resolve_model_path(model, None)
        return load_model(path, self.dtype, self.device, self.max_model_len,
                          self.config.load_format, backend=self.backend).model

    def shutdown(self) -> None:
        """Stop the tensor-parallel ranks, if any."""
        if self.tp is not None:
            self.tp.close()

    @torch.inference_mode()
    def _profile_forward(self) -> int:
        """GPU: peak activation bytes of the largest step (a full token budget), measured."""
        if self.device.type != "cuda":
            return 0
        cfg = self.config
        tokens = min(cfg.max_num_batched_tokens, self.max_model_len)
        dev = self.device
        run = self.dummy_forward(tokens)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        hidden = run()
        self.model.compute_logits(hidden[: min(tokens, cfg.max_num_seqs)])
        torch.cuda.synchronize()
        # The temporary cache was allocated before `before`; the peak is activations only.
        peak = torch.cuda.max_memory_allocated(dev) - before
        del run, hidden
        torch.cuda.empty_cache()
        return peak

    @torch.inference_mode()
    def _warm_up_cpu(self) -> float:
        """CPU: a few representative shapes before the first request (a prompt of up to
        _WARM_UP_PROMPT tokens, and a batch of one-token rows as a decode step has), so that
        it does not pay for loading the native kernels, oneDNN's first primitives or the first
        growth of the heap. Not a full token budget: on a small CPU a max_model_len prefill
        took minutes. Returns the seconds it took."""
        t0 = time.perf_counter()
        prompt = max(1, min(_WARM_UP_PROMPT, self.config.max_num_batched_tokens,
                            self.max_model_len))
        rows = max(1, min(_WARM_UP_DECODE_ROWS, self.config.max_num_seqs))
        for tokens, seqs in ((prompt, 1), (1, rows)):
            hidden = self.dummy_forward(tokens, seqs)()
            self.model.compute_logits(hidden[-seqs:])
        return time.perf_counter() - t0


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def _zeros_lazily(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero CPU tensor whose pages the OS zero-fills at first touch: numpy's zeros is calloc,
    which for a large block maps fresh zero pages instead of writing them (torch.zeros
    writes every byte: seconds for a pool of a GB on a small CPU)."""
    import numpy as np

    itemsize = torch.empty(0, dtype=dtype).element_size()
    raw = np.zeros(int(np.prod(shape)) * itemsize, dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype).view(shape)
