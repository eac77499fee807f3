"""EngineCore: scheduler + KV cache + model runner + sampler; token ids in, token ids out.

The device side (model, KV pool, graphs, warm-up) is the `Worker` (engine/worker.py); the core
adds, aborts and steps requests and reports statistics. It knows nothing of HTTP or text.
`LLM` drives it in-process; the server runs it in its own process (engine/core_process.py,
docs/engine-core.md).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable

import torch

from soberana.engine.config import EngineConfig
from soberana.engine.kv_cache_manager import KVCacheManager
from soberana.engine.model_runner import ModelRunner, ModelRunnerOutput, PendingStep
from soberana.engine.outputs import (
    EngineCoreOutput,
    EngineCoreRequest,
    ModelInfo,
    SchedulerStats,
)
from soberana.engine.request import PLACEHOLDER, Request, RequestStatus
from soberana.engine.sampler import Sampler
from soberana.engine.scheduler import Scheduler, SchedulerOutput
from soberana.engine.worker import Worker
from soberana.models.loader import is_demo_path, quantized_kernels
from soberana.structured.manager import StructuredOutputManager

log = logging.getLogger("soberana.engine")


class EngineCore:
    """Schedules requests over a `Worker`'s model and KV pool: add, abort, step, stats."""

    def __init__(self, config: EngineConfig) -> None:
        config.validate()
        self.config = config
        t0 = time.perf_counter()
        self.worker = worker = Worker(config)
        worker.load_model()
        worker.initialize_kv_cache()
        worker.compile_or_warm_up()
        device = worker.device
        mcfg = worker.model_config
        self.kv = KVCacheManager(worker.num_blocks, config.block_size,
                                 config.enable_prefix_caching, worker.layout.fingerprint)
        self._warehouse_stats_at = 0.0
        self._warehouse_stats = None
        self.offload = self._build_offload(config)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.offload, config.long_prefill_token_threshold)
        self.sampler = Sampler(mcfg.vocab_size, device, worker.backend.kernels.argmax)
        self.structured = StructuredOutputManager(worker.path, mcfg.vocab_size,
                                                  list(mcfg.eos_token_ids), device=device)
        self.runner = ModelRunner(worker.model, worker.kv_cache, self.kv, self.sampler, device,
                                  worker.graphs, self.structured)
        self.requests: dict[str, list[Request]] = {}  # request_id -> its samples
        # Async scheduling (default on GPUs): the step launched last, not yet read back.
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else device.type == "cuda")
        self._pending: PendingStep | None = None
        self.spec = self._build_spec_decode(config)
        self.generation_tokens = 0
        self.prompt_tokens = 0
        if config.seed is not None:
            torch.manual_seed(config.seed)
        self.model_info = _model_info(config, worker)
        phases = worker.startup
        log.info("engine ready in %.1fs (find model %.1fs, load %.1fs, KV pool %.1fs%s) on %s",
                 time.perf_counter() - t0, phases["find_model_s"], phases["model_s"],
                 phases["kv_alloc_s"], f", warm-up {phases['warm_up_s']:.1f}s"
                 if "warm_up_s" in phases else "", device)  # fmt: skip

    def _build_spec_decode(self, config: EngineConfig):
        """Speculative decoding (soberana/engine/spec_decode), or None. With async
        scheduling, steps that verify drafts are read back at once (the next drafts continue
        their accepted tokens); steps without drafts keep overlapping."""
        spec_cfg = config.speculative_config
        if spec_cfg is None:
            return None
        from soberana.engine.spec_decode.manager import SpecDecode, build_proposer
        from soberana.engine.spec_decode.rejection import verify

        worker = self.worker
        proposer = build_proposer(spec_cfg, worker.model, worker.load_draft_model,
                                  worker.num_blocks * config.block_size, config.block_size,
                                  worker.device, worker.dtype, worker.model_config.vocab_size)
        self.runner.verify = lambda logits, r, drafts, bitmask: verify(
            logits, r, drafts, self.sampler, bitmask)
        self.runner.verify_graphs = worker.verify_graphs  # captured by the worker on GPUs
        if worker.graphs is not None and hasattr(proposer, "capture_graphs"):
            worker.startup["graphs_s"] += proposer.capture_graphs(
                min(config.max_num_seqs, spec_cfg.disable_by_batch_size),
                worker.graphs.block_table.shape[1])
        log.info("speculative decoding: %s, %d tokens", spec_cfg.method,
                 spec_cfg.num_speculative_tokens)
        return SpecDecode(spec_cfg, proposer, worker.max_model_len, self.structured.valid_drafts)

    def _build_offload(self, config: EngineConfig):
        wcfg = config.kv_warehouse
        if wcfg is None or not wcfg.enabled():
            return None
        from soberana.engine.kv_offload import KVOffload
        from soberana.kv.build import build_warehouse

        worker = self.worker
        warehouse = build_warehouse(wcfg, worker.layout)
        if wcfg.load_policy == "auto":
            warehouse.calibrate(worker.prefill_tokens_per_s(), worker.device)
        return KVOffload(warehouse, self.kv, worker.kv_cache, wcfg.write_through,
                         worker.model if worker.tp is not None else None)

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
        outputs: list[EngineCoreOutput] = []
        if self.spec is not None:  # drafts for this step's decodes
            if self._pending is not None and self.spec.would_draft(self.scheduler.running):
                # Drafts continue the known tokens: read the in-flight step first.
                outputs = self._resolve(self._pending)
                self._pending = None
            self.spec.propose(self.scheduler.running)
        sched = self.scheduler.schedule()
        prev, self._pending = self._pending, None
        if prev is not None and (not sched.scheduled or _needs_known_tokens(sched)):
            outputs += self._resolve(prev)
            prev = None
            sched.scheduled = [s for s in sched.scheduled if not s.request.status.finished]
        if not sched.scheduled:
            if not outputs and self.offload is not None and self.scheduler.loading:
                self.offload.wait_any(0.002)  # only loads in flight: do not spin
            return outputs
        pending = self.runner.launch(sched, prev)
        self._commit(sched, pending)
        if prev is not None:
            outputs += self._resolve(prev)
        if self.async_scheduling and not pending.verified:
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
            if finish is not None:
                del r.output_token_ids[idx + 1:]  # drop an in-flight successor
                r.num_placeholders = 0
            logprobs = [result.logprobs[r.key]] if r.key in result.logprobs else None
            outputs.append(self._output(r, [token], logprobs, idx == 0, finish))
        return outputs

    def _apply_verified(self, pending: PendingStep,
                        result: ModelRunnerOutput) -> list[EngineCoreOutput]:
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
                self.structured.accept(r, token)
                finish = self._check_stop(r, token, len(r.output_token_ids))
                if finish is not None:
                    break
            self.generation_tokens += len(emitted)
            self.kv.register_computed(r)
            emitted_logprobs = logprobs[: len(emitted)] if logprobs is not None else None
            outputs.append(self._output(r, emitted, emitted_logprobs, first == 0, finish))
        return outputs

    def _output(self, r: Request, token_ids: list[int], logprobs: list | None, first: bool,
                finish: RequestStatus | None) -> EngineCoreOutput:
        """The step's output for `r` (its first carries the prompt's facts); a `finish`
        ends the request here and forgets it everywhere."""
        out = EngineCoreOutput(
            request_id=r.request_id,
            index=r.index,
            new_token_ids=token_ids,
            new_logprobs=logprobs,
            num_cached_tokens=max(r.num_cached_tokens, 0),
        )
        if first:
            out.scheduled_time = r.scheduled_time
            out.prompt_logprobs = r.prompt_logprobs
        if finish is not None:
            out.finish_reason = finish.value
            out.stop_reason = r.stop_reason
            self.scheduler.finish(r, finish)
            self.sampler.forget(r)
            self.structured.forget(r)
            self._forget_if_done(r.request_id)
        return out

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
        """Release background resources (the KV warehouse's threads and connections, the
        tensor-parallel ranks)."""
        if self.offload is not None:
            self.offload.warehouse.close()
        self.worker.shutdown()


def _model_info(config: EngineConfig, worker: Worker) -> ModelInfo:
    """What the front end is told about the served model (name, lengths, pool, layout)."""
    from soberana.models.default_model import DEFAULT_MODEL
    from soberana.models.demo import DEMO_NAME

    is_demo = is_demo_path(worker.path)
    default_name = DEMO_NAME if is_demo else DEFAULT_MODEL
    mcfg = worker.model_config
    return ModelInfo(
        name=config.served_model_name or (default_name if config.model is None or is_demo
                                          else str(config.model)),
        path=str(worker.path),
        max_model_len=worker.max_model_len,
        vocab_size=mcfg.vocab_size,
        eos_token_ids=list(mcfg.eos_token_ids),
        dtype=str(worker.dtype).removeprefix("torch."),
        device=str(worker.device),
        num_blocks=worker.num_blocks,
        block_size=config.block_size,
        fingerprint=worker.layout.fingerprint.hex(),
        is_demo=is_demo,
        quantization=None if worker.quantization is None else worker.quantization.describe(),
        quantization_kernels=(quantized_kernels(getattr(worker.model, "model", worker.model))
                              if worker.quantization else None),  # rank 0's shard under TP
        kv_cache_dtype=config.kv_cache_dtype,
        compute=worker.backend.report(getattr(worker.model, "model", worker.model)),
    )


def _needs_known_tokens(sched: SchedulerOutput) -> bool:
    """Penalties read the output so far, and a grammar's mask follows from every token
    before it: the in-flight step's ids must be on the host."""
    return any(s.request.params.has_penalties or s.request.params.structured_outputs is not None
               for s in sched.scheduled)
