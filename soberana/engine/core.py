"""EngineCore: scheduler + KV cache + model runner + sampler; token ids in, token ids out.

It knows nothing of HTTP or text. `LLM` drives it in-process; the server runs it in its own
process (docs/engine-core.md).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from soberana.engine.block_hash import hash_seed
from soberana.engine.config import EngineConfig
from soberana.engine.cuda_graphs import DecodeGraphs
from soberana.engine.kv_cache_manager import KVCacheManager
from soberana.engine.model_runner import ModelRunner, PendingStep
from soberana.engine.outputs import EngineCoreOutput, EngineCoreRequest, SchedulerStats
from soberana.engine.request import PLACEHOLDER, Request, RequestStatus
from soberana.engine.sampler import Sampler
from soberana.engine.scheduler import Scheduler, SchedulerOutput
from soberana.models.loader import (
    is_demo_path,
    load_model,
    quantized_kernels,
    read_model_config,
    resolve_model_path,
)
from soberana.ops.attention import AttentionMetadata
from soberana.ops.backend import select_backend
from soberana.ops.cpu import kernels as cpu_kernels
from soberana.quantization import resolve_quantization
from soberana.structured.manager import StructuredOutputManager

log = logging.getLogger("soberana.engine")

_CPU_DEFAULT_KV_GB = 4.0
# CPU: the pool holds this many tokens by default (or max_model_len, if longer): a CPU's
# throughput saturates at a few dozen sequences, and zeroing an unused pool costs start-up.
_CPU_DEFAULT_KV_TOKENS = 16384
_WARM_UP_PROMPT = 128
_WARM_UP_DECODE_ROWS = 8


@dataclass
class ModelInfo:
    name: str
    path: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    dtype: str
    device: str
    num_blocks: int
    block_size: int
    fingerprint: str
    is_demo: bool
    task: str = "generate"  # or "embed" / "rerank" (soberana.engine.pooling_core)
    quantization: str | None = None  # scheme serving the weights (None: the model dtype)
    quantization_kernels: list[str] | None = None
    kv_cache_dtype: str = "auto"
    # the compute backend's choice (ops/backend.py: Backend.report)
    compute: dict | None = None


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


def resolve_device(device: str) -> torch.device:
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
    matmuls are slower than float32 on CPUs)."""
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


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        config.validate()
        self.config = config
        t0 = time.perf_counter()
        self.device = resolve_device(config.device)
        # Allocator tuning is process-wide: the entry points opt in (engine/process_memory.py).
        path = resolve_model_path(config.model, config.revision)
        t_found = time.perf_counter()
        mcfg, _ = read_model_config(path)
        dtype = resolve_dtype(config.dtype, mcfg.torch_dtype, self.device, config.cpu_isa)
        kv_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, dtype)
        self.backend = select_backend(config.compute_backend, self.device, dtype, kv_dtype,
                                      config.cpu_isa)  # fmt: skip
        max_len = self._max_model_len(config, mcfg)
        # A GGUF file carries no config.json: its weights are dequantized at load.
        hf_config = {} if path.is_file() else json.loads((path / "config.json").read_text())
        quantization = resolve_quantization(config.quantization, hf_config)
        self.tp = None  # tensor parallel: the workers and rank 0's group (soberana/distributed)
        if config.tensor_parallel_size > 1:
            from soberana.distributed.executor import TensorParallel

            if quantization is not None:
                raise ValueError("quantization is not supported with tensor_parallel_size > 1 "
                                 "yet (docs/distributed.md)")
            self.tp = TensorParallel(config, path, dtype, self.device, max_len, self.backend)
            loaded = self.tp.loaded
        else:
            loaded = load_model(path, dtype, self.device, max_len, config.load_format,
                                quantization, self.backend)
        self.model = loaded.model
        mcfg = loaded.config
        t_model = time.perf_counter()

        block_size = config.block_size
        if kv_dtype != dtype and self.device.type == "cuda":
            raise ValueError("kv_cache_dtype fp8 is served on CPUs only in this build: the "
                             "Triton attention kernels read the cache in the model dtype; "
                             "use --kv-cache-dtype auto on GPUs")  # fmt: skip
        bytes_per_block = 2 * mcfg.num_layers * block_size * mcfg.kv_size * kv_dtype.itemsize
        activation_bytes = self._profile_forward(mcfg, dtype, max_len)
        num_blocks = self._num_blocks(config, bytes_per_block, max_len, activation_bytes)
        if num_blocks < 1:
            raise ValueError("the KV cache is too small for a single block; raise kv_cache_gb")
        if max_len > num_blocks * block_size:
            log.warning("max_model_len %d exceeds the KV pool (%d tokens); capping it",
                        max_len, num_blocks * block_size)
            max_len = num_blocks * block_size
        kv_shape = (mcfg.num_layers, 2, num_blocks, block_size, mcfg.num_kv_heads, mcfg.head_dim)
        if self.device.type == "cpu":
            self.kv_cache = _zeros_lazily(kv_shape, kv_dtype)
        else:
            self.kv_cache = torch.zeros(kv_shape, dtype=kv_dtype, device=self.device)
        if self.tp is not None:  # each rank's pool: the same blocks, its own KV heads
            self.tp.model.share_kv_cache(self.kv_cache)
        log.info("KV cache: %d blocks x %d tokens = %d tokens (%.2f GB, %s)", num_blocks,
                 block_size, num_blocks * block_size, num_blocks * bytes_per_block / 1e9,
                 kv_dtype)  # fmt: skip
        layout = f"L{mcfg.num_layers}x2xNBx{block_size}x{mcfg.num_kv_heads}x{mcfg.head_dim}"
        # the cache's own dtype names its blocks: fp8 blocks are their own layout
        dtype_name = str(kv_dtype).removeprefix("torch.")
        seed = hash_seed(loaded.fingerprint, dtype_name, block_size, layout)
        self.kv = KVCacheManager(num_blocks, block_size, config.enable_prefix_caching, seed)
        self.offload = self._build_offload(config, loaded.fingerprint, mcfg, max_len)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.offload, config.long_prefill_token_threshold)
        self.sampler = Sampler(mcfg.vocab_size, self.device, self.backend.kernels.argmax)
        self.structured = StructuredOutputManager(path, mcfg.vocab_size, list(mcfg.eos_token_ids))
        graphs = None
        self.startup = {"model_s": t_model - t0, "kv_alloc_s": 0.0, "graphs_s": 0.0}
        self.startup["kv_alloc_s"] = time.perf_counter() - t_model
        if (self.device.type == "cuda" and not config.enforce_eager and self.backend.name == "triton"
                and self.tp is None):  # graphs with collectives: not built yet (docs/distributed.md)
            graphs = DecodeGraphs(self.model, self.kv_cache, config.max_num_seqs,
                                  -(-max_len // block_size), self.device)
            self.startup["graphs_s"] = graphs.capture()
        self.runner = ModelRunner(self.model, self.kv_cache, self.kv, self.sampler, self.device,
                                  graphs, self.structured)
        if self.device.type == "cpu":
            self.startup["warm_up_s"] = self._warm_up_cpu(mcfg, max_len)
        self.requests: dict[str, list[Request]] = {}  # request_id -> its samples
        # Async scheduling (default on GPUs): the step launched last, not yet read back.
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.device.type == "cuda")
        self._pending: PendingStep | None = None
        self.spec = self._build_spec_decode(config, path, dtype, max_len, num_blocks)
        self.generation_tokens = 0
        self.prompt_tokens = 0
        if config.seed is not None:
            torch.manual_seed(config.seed)

        from soberana.models.default_model import DEFAULT_MODEL
        from soberana.models.demo import DEMO_NAME

        is_demo = is_demo_path(path)
        default_name = DEMO_NAME if is_demo else DEFAULT_MODEL
        self.model_info = ModelInfo(
            name=config.served_model_name or (default_name if config.model is None or is_demo
                                              else str(config.model)),
            path=str(path),
            max_model_len=max_len,
            vocab_size=mcfg.vocab_size,
            eos_token_ids=list(mcfg.eos_token_ids),
            dtype=dtype_name,
            device=str(self.device),
            num_blocks=num_blocks,
            block_size=block_size,
            fingerprint=seed.hex(),
            is_demo=is_demo,
            quantization=None if quantization is None else quantization.describe(),
            quantization_kernels=quantized_kernels(self.model) if quantization else None,
            kv_cache_dtype=config.kv_cache_dtype,
            compute=self.backend.report(getattr(self.model, "model", self.model)),
        )
        log.info("engine ready in %.1fs (find model %.1fs, load %.1fs, KV pool %.1fs%s) on %s",
                 time.perf_counter() - t0, t_found - t0, t_model - t_found,
                 self.startup["kv_alloc_s"], f", warm-up {self.startup['warm_up_s']:.1f}s"
                 if "warm_up_s" in self.startup else "", self.device)  # fmt: skip

    def _build_spec_decode(self, config: EngineConfig, path, dtype: torch.dtype, max_len: int,
                           num_blocks: int):
        """Speculative decoding (soberana/engine/spec_decode), or None. Verification is
        synchronous: async scheduling is turned off while speculating."""
        spec_cfg = config.speculative_config
        if spec_cfg is None:
            return None
        from soberana.engine.spec_decode.manager import SpecDecode, build_proposer
        from soberana.engine.spec_decode.rejection import verify

        if self.async_scheduling:
            log.warning("speculative decoding: async scheduling turned off")
            self.async_scheduling = False

        def load_draft(draft_path: str):
            p = resolve_model_path(draft_path, None)
            return load_model(p, dtype, self.device, max_len, config.load_format,
                              backend=self.backend).model

        proposer = build_proposer(spec_cfg, self.model, load_draft, num_blocks * config.block_size,
                                  config.block_size, self.device, dtype,
                                  self.model.config.vocab_size)
        self.runner.verify = lambda logits, r, drafts: verify(logits, r, drafts, self.sampler)
        log.info("speculative decoding: %s, %d tokens", spec_cfg.method,
                 spec_cfg.num_speculative_tokens)
        return SpecDecode(spec_cfg, proposer, max_len)

    def _build_offload(self, config: EngineConfig, fingerprint: str, mcfg, max_len: int):
        wcfg = config.kv_warehouse
        if wcfg is None or not wcfg.enabled():
            return None
        from soberana.engine.kv_offload import KVOffload
        from soberana.kv.build import build_warehouse
        from soberana.kv.layout import KVLayout

        warehouse = build_warehouse(wcfg, KVLayout.from_kv_cache(self.kv_cache, fingerprint))
        if wcfg.load_policy == "auto":
            warehouse.calibrate(self._prefill_tokens_per_s(mcfg, max_len), self.device)
        self._warehouse_stats_at = 0.0
        self._warehouse_stats = None
        return KVOffload(warehouse, self.kv, self.kv_cache, wcfg.write_through)

    @torch.inference_mode()
    def _prefill_tokens_per_s(self, mcfg, max_len: int) -> float:
        """Measured prefill rate of one 512-token sequence, for the load-or-recompute choice."""
        tokens = min(512, max_len, self.config.max_num_batched_tokens)
        run = self._dummy_forward(mcfg, self.kv_cache.dtype, tokens)
        seconds = []
        for _ in range(3):
            t = time.perf_counter()
            run()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds.append(time.perf_counter() - t)
        return tokens / min(seconds[1:])

    def _dummy_forward(self, mcfg, dtype: torch.dtype, tokens: int, seqs: int = 1):
        """A forward of `seqs` prompts of `tokens` each over a temporary KV cache (for
        profiling and warm-up); returns a callable giving the final hidden states."""
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
        return lambda: self.model(ids, pos, tmp, meta)

    @torch.inference_mode()
    def _warm_up_cpu(self, mcfg, max_len: int) -> float:
        """CPU: a few representative shapes before the first request (a prompt of up to
        _WARM_UP_PROMPT tokens, and a batch of one-token rows as a decode step has), so that
        it does not pay for loading the native kernels, oneDNN's first primitives or the first
        growth of the heap. Not a full token budget: on a small CPU a max_model_len prefill
        took minutes. Returns the seconds it took."""
        t0 = time.perf_counter()
        prompt = max(1, min(_WARM_UP_PROMPT, self.config.max_num_batched_tokens, max_len))
        rows = max(1, min(_WARM_UP_DECODE_ROWS, self.config.max_num_seqs))
        for tokens, seqs in ((prompt, 1), (1, rows)):
            hidden = self._dummy_forward(mcfg, self.kv_cache.dtype, tokens, seqs)()
            self.model.compute_logits(hidden[-seqs:])
        return time.perf_counter() - t0

    @staticmethod
    def _max_model_len(config: EngineConfig, mcfg) -> int:
        limit = mcfg.max_position_embeddings
        if mcfg.sliding_window is not None and mcfg.sliding_window < limit:
            # Attention here is full; within the window full and sliding attention agree.
            log.warning("sliding window %d: max_model_len limited to it", mcfg.sliding_window)
            limit = mcfg.sliding_window
        if config.max_model_len is None:
            return limit
        if config.max_model_len > limit:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the model's limit of {limit}"
            )
        return config.max_model_len

    @torch.inference_mode()
    def _profile_forward(self, mcfg, dtype: torch.dtype, max_len: int) -> int:
        """GPU: peak activation bytes of the largest step (a full token budget), measured."""
        if self.device.type != "cuda":
            return 0
        cfg = self.config
        tokens = min(cfg.max_num_batched_tokens, max_len)
        dev = self.device
        run = self._dummy_forward(mcfg, dtype, tokens)
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

    def _num_blocks(
        self, config: EngineConfig, bytes_per_block: int, max_len: int, activation_bytes: int
    ) -> int:
        if config.kv_cache_gb is not None:
            return int(config.kv_cache_gb * 1e9) // bytes_per_block
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            # `free` is the card's, so memory held by other processes (another engine, a
            # notebook) already counts against the budget: after the pool, this process plus
            # everyone else stays under gpu_memory_utilization of the card. Keep the profiled
            # activations and ~1 GiB for CUDA graphs and the sampler.
            budget = (free - (1 - config.gpu_memory_utilization) * total
                      - activation_bytes - 2**30)
            others = max(0, total - free - torch.cuda.memory_reserved(self.device))
            log.info(
                "KV pool: %.2f GiB, so the card stays under %.0f%% of %.1f GiB; %.2f GiB of it "
                "is outside this process's allocator (other processes, CUDA contexts)", max(0, budget) / 2**30, 100 * config.gpu_memory_utilization,
                total / 2**30, others / 2**30,
            )
            return max(0, int(budget)) // bytes_per_block
        # CPU: by need: max(max_model_len, _CPU_DEFAULT_KV_TOKENS) tokens, no more than every
        # sequence at full length, within 4 GB and 20% of free RAM (kv_cache_gb for more).
        useful = config.max_num_seqs * max_len / config.block_size * bytes_per_block
        need = max(max_len, _CPU_DEFAULT_KV_TOKENS) / config.block_size * bytes_per_block
        budget = min(_CPU_DEFAULT_KV_GB * 1e9, 0.2 * _available_ram(), useful, need)
        return max(int(budget) // bytes_per_block, -(-max_len // config.block_size))

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, req: EngineCoreRequest) -> None:
        """Queue a request; raises ValueError (naming the field) when it cannot be served."""
        info = self.model_info
        params = req.sampling_params
        prompt = req.prompt_token_ids
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        if not prompt:
            raise ValueError("prompt must contain at least one token")
        if min(prompt) < 0 or max(prompt) >= info.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {info.vocab_size - 1}]")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(params, name)
            if n is not None and n > self.config.max_logprobs:
                raise ValueError(f"{name} must be <= {self.config.max_logprobs}; got {n}")
        room = info.max_model_len - len(prompt)
        if params.max_tokens is None:
            if room < 1:
                raise ValueError(
                    f"the prompt has {len(prompt)} tokens but the context length is "
                    f"{info.max_model_len}: no room for output"
                )
            max_tokens = room
        else:
            if params.max_tokens > room:
                raise ValueError(
                    f"the prompt has {len(prompt)} tokens and max_tokens is {params.max_tokens}:"
                    f" {len(prompt) + params.max_tokens} exceeds the context length of "
                    f"{info.max_model_len}"
                )
            max_tokens = params.max_tokens
        if not params.eos_token_ids:
            params = params.clone(eos_token_ids=list(info.eos_token_ids))
        leader = None
        samples = []
        for i in range(params.n):
            r = Request(req.request_id, i, prompt, params, req.arrival_time, req.priority,
                        req.cache_salt, max_tokens, leader=leader)
            leader = leader or r
            samples.append(r)
        for r in samples:  # a malformed grammar refuses the request before it is queued
            self.structured.add(r)
        for r in samples:
            self.scheduler.add(r)
        self.requests[req.request_id] = samples

    def abort_requests(self, request_ids: Iterable[str | tuple[str, int]]) -> None:
        """Stop requests (an id: every sample; an (id, index) pair: that sample) now and free
        their blocks; unknown or finished ones are ignored."""
        for rid in request_ids:
            index = None
            if isinstance(rid, tuple):
                rid, index = rid
            for r in self.requests.get(rid, []):
                if (index is None or r.index == index) and not r.status.finished:
                    self.scheduler.finish(r, RequestStatus.FINISHED_ABORTED)
                    self.sampler.forget(r)
                    self.structured.forget(r)
            self._forget_if_done(rid)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._pending is not None

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[EngineCoreOutput]:
        """Schedule, launch the model once, and report what requests produced.

        With async scheduling the step launched here is left running on the device and the
        outputs returned are those of the previous step, read back while this one runs: the
        host's scheduling and input preparation overlap the device's work.
        """
        if self.spec is not None:  # drafts for this step's decodes
            self.spec.propose(self.scheduler.running)
        sched = self.scheduler.schedule()
        prev, self._pending = self._pending, None
        outputs: list[EngineCoreOutput] = []
        if prev is not None and (not sched.scheduled or _needs_known_tokens(sched)):
            outputs = self._resolve(prev)
            prev = None
            sched.scheduled = [s for s in sched.scheduled if not s.request.status.finished]
        if not sched.scheduled:
            if not outputs and self.offload is not None and self.scheduler.loading:
                self.offload.wait_any(0.002)  # only loads in flight: do not spin
            return outputs
        pending = self.runner.launch(sched, prev)
        self._commit(sched, pending)
        if prev is not None:
            outputs = self._resolve(prev)
        if self.async_scheduling:
            self._pending = pending
        else:
            outputs += self._resolve(pending)
        return outputs

    def _commit(self, sched: SchedulerOutput, pending: PendingStep) -> None:
        """Advance requests past a launched step: its tokens count as computed, and each
        sampled row holds a placeholder in its output until the id is read back."""
        for s in sched.scheduled:
            r = s.request
            if r.num_computed_tokens < r.num_prompt_tokens:
                self.prompt_tokens += min(s.num_new_tokens,
                                          r.num_prompt_tokens - r.num_computed_tokens)
            r.num_computed_tokens += s.num_new_tokens
        for r in pending.requests:
            pending.output_index.append(len(r.output_token_ids))
            r.output_token_ids.append(PLACEHOLDER)
            r.num_placeholders += 1

    def _resolve(self, pending: PendingStep) -> list[EngineCoreOutput]:
        """Read a launched step's ids back, apply them, and report (finishing requests)."""
        result = pending.result()
        live: list[tuple[Request, int, int]] = []
        for r, idx in zip(pending.requests, pending.output_index):
            if r.status.finished:  # aborted, or ended by the step before (its row is void)
                continue
            token = result.sampled[r.key]
            r.output_token_ids[idx] = token
            r.num_placeholders -= 1
            self.structured.accept(r, token)
            if r.status == RequestStatus.RUNNING:
                self.kv.register_computed(r)  # a block this id completed is named now
            live.append((r, idx, token))
        if self.offload is not None:  # before finished requests give their blocks back
            self.offload.after_step([s.request for s in pending.scheduled
                                     if s.request.status == RequestStatus.RUNNING])
        for s in pending.scheduled:
            r = s.request
            if r.key in result.prompt_logprobs:
                r.prompt_logprobs.extend(result.prompt_logprobs[r.key])
        outputs = self._apply_verified(pending, result) if result.verified else []
        for r, idx, token in live:
            self.generation_tokens += 1
            finish = self._check_stop(r, token, idx + 1)
            out = EngineCoreOutput(
                request_id=r.request_id,
                index=r.index,
                new_token_ids=[token],
                new_logprobs=[result.logprobs[r.key]] if r.key in result.logprobs else None,
                num_cached_tokens=max(r.num_cached_tokens, 0),
            )
            if idx == 0:
                out.scheduled_time = r.scheduled_time
                out.prompt_logprobs = r.prompt_logprobs
            if finish is not None:
                del r.output_token_ids[idx + 1:]  # drop an in-flight successor
                r.num_placeholders = 0
                out.finish_reason = finish.value
                out.stop_reason = r.stop_reason
                self.scheduler.finish(r, finish)
                self.sampler.forget(r)
                self.structured.forget(r)
                self._forget_if_done(r.request_id)
            outputs.append(out)
        return outputs

    def _apply_verified(self, pending: PendingStep, result) -> list[EngineCoreOutput]:
        """Speculative decoding: append each verified request's accepted drafts and its one
        target token (up to a stop), and roll its KV back past the rejected drafts."""
        outputs = []
        for s in pending.scheduled:
            r = s.request
            if r.key not in result.verified or r.status.finished:
                continue
            tokens, logprobs = result.verified[r.key]
            k = len(s.draft_token_ids)
            accepted = len(tokens) - 1
            self.spec.record(r, k, accepted)
            # Positions of rejected drafts hold garbage: they no longer count as computed.
            r.num_computed_tokens -= k - accepted
            self.kv.truncate(r, r.num_computed_tokens)
            first = len(r.output_token_ids)
            finish = None
            emitted = []
            for token in tokens:
                r.output_token_ids.append(token)
                emitted.append(token)
                finish = self._check_stop(r, token, len(r.output_token_ids))
                if finish is not None:
                    break
            self.generation_tokens += len(emitted)
            self.kv.register_computed(r)
            out = EngineCoreOutput(
                request_id=r.request_id, index=r.index, new_token_ids=emitted,
                new_logprobs=logprobs[: len(emitted)] if logprobs is not None else None,
                num_cached_tokens=max(r.num_cached_tokens, 0),
            )
            if first == 0:
                out.scheduled_time = r.scheduled_time
                out.prompt_logprobs = r.prompt_logprobs
            if finish is not None:
                out.finish_reason = finish.value
                out.stop_reason = r.stop_reason
                self.scheduler.finish(r, finish)
                self.sampler.forget(r)
                self._forget_if_done(r.request_id)
            outputs.append(out)
        return outputs

    def _check_stop(self, r: Request, token: int, num_output: int) -> RequestStatus | None:
        """Why the request ends with `token`, its `num_output`-th output token (or None)."""
        p = r.params
        if num_output >= p.min_tokens:
            if not p.ignore_eos and token in p.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token in p.stop_token_ids:
                r.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if num_output >= r.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if r.num_prompt_tokens + num_output >= self.model_info.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _forget_if_done(self, request_id: str) -> None:
        samples = self.requests.get(request_id)
        if samples and all(s.status.finished for s in samples):
            del self.requests[request_id]

    def get_stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running_reqs=len(self.scheduler.running),
            num_waiting_reqs=len(self.scheduler.waiting),
            kv_cache_usage=self.kv.usage(),
            num_blocks=self.model_info.num_blocks,
            prefix_cache_queries=self.kv.prefix_queries,
            prefix_cache_hits=self.kv.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            kv_warehouse=self._latest_warehouse_stats(),
            spec_decoding=copy.deepcopy(self.spec.stats) if self.spec is not None else None,
        )

    def _latest_warehouse_stats(self):
        # Tier usage may need a network round trip (Redis): refresh at most once a second.
        if self.offload is None:
            return None
        now = time.monotonic()
        if self._warehouse_stats is None or now - self._warehouse_stats_at > 1.0:
            self._warehouse_stats = self.offload.warehouse.stats()
            self._warehouse_stats_at = now
        return self._warehouse_stats

    def shutdown(self) -> None:
        """Release background resources (the KV warehouse's threads and connections)."""
        if self.offload is not None:
            self.offload.warehouse.close()
        if self.tp is not None:
            self.tp.close()


def _needs_known_tokens(sched: SchedulerOutput) -> bool:
    """Penalties read the output so far, and a grammar's mask follows from every token
    before it: the in-flight step's ids must be on the host."""
    return any(s.request.params.has_penalties or s.request.params.structured_outputs is not None
               for s in sched.scheduled)
