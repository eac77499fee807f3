"""The API process's engine: requests out, per-request streams in.

The engine-core process and its pipe threads are `soberana.engine.core_client`'s; its reader
thread hands whatever the core sent to the event loop as one batch, and the loop here
detokenizes (OutputProcessor), finds stop strings, records metrics and wakes each request's
stream.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from soberana.engine.config import EngineConfig
from soberana.engine.core_client import EngineCoreClient, EngineDeadError
from soberana.engine.core_process import AbortRequests, CoreFatal, EngineCoreOutputs, FromCore
from soberana.engine.outputs import (
    EngineCoreRequest,
    ModelInfo,
    PoolingOutput,
    PoolingRequest,
    RequestOutput,
    SchedulerStats,
)
from soberana.engine.sampling_params import SamplingParams
from soberana.server.agent_request import AgentOptions
from soberana.server.metrics import RequestTimes, ServerMetrics
from soberana.server.request_log import current_request, note_finished

if TYPE_CHECKING:
    from soberana.engine.output_processor import OutputProcessor

logger = logging.getLogger("soberana.server")

# Characters of prompt text above which tokenization leaves the event loop: ~1-2 ms of work on
# a slow core, against ~0.1 ms for the hop to the tokenizer thread and back.
OFFLOAD_TOKENIZATION_CHARS = 4096
# Tokenizer threads: the Rust tokenizer releases the GIL while it encodes, so two long prompts
# proceed side by side instead of one waiting ~seconds behind the other.
TOKENIZER_WORKERS = 2
# Long-text jobs admitted to the tokenizer pool at once (queued or running); past this a
# request gets a 429 rather than an unbounded queue of prompts held in memory.
MAX_TOKENIZER_JOBS = 64

T = TypeVar("T")


class EngineRejectedError(ValueError):
    """The core refused a request (its ValueError's message)."""


class QueueFullError(RuntimeError):
    """More requests are waiting than --max-waiting-requests allows."""


class ServerShuttingDownError(EngineDeadError):
    """The request was still running when --shutdown-timeout expired."""


class RequestStream:
    """Outputs of one engine request as they arrive, read by one handler.

    Each output is a delta: text, token ids and logprobs new since the previous one. A
    streaming handler is woken for every output; any other only once the request ends,
    so that a step of N requests does not cost N task switches.
    """

    def __init__(self, request_id: str, streaming: bool) -> None:
        self.request_id = request_id
        self.streaming = streaming
        self._pending: list[RequestOutput] = []
        self._error: Exception | None = None
        # The reading handler's wake-up while it waits; a bare future is cheaper per token
        # than an asyncio.Event.
        self._waiter: asyncio.Future | None = None

    def put(self, output: RequestOutput) -> None:
        self._pending.append(output)
        if self.streaming or output.finished:
            self._wake()

    def fail(self, error: Exception) -> None:
        self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> list[RequestOutput]:
        """Every output that arrived since the last call (waits for at least one; when not
        streaming, for the last)."""
        while not self._pending or not (self.streaming or self._pending[-1].finished):
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        outputs, self._pending = self._pending, []
        return outputs


class _Tracked:
    """What the client keeps per in-flight request: its stream and its timings."""

    def __init__(self, stream: RequestStream, times: RequestTimes, n: int) -> None:
        self.stream = stream
        self.times = times
        self.unfinished = set(range(n))  # sample indices not yet finished
        # The HTTP request's log record (made in the request's context, which we run in here).
        self.record = current_request.get()


class EngineClient:
    """Routes requests to the engine-core process (`EngineCoreClient`) and its outputs back to
    each request's stream, with the tokenizer, detokenization and metrics on the way."""

    def __init__(
        self, config: EngineConfig, max_waiting_requests: int, chat_template: str | None = None
    ) -> None:
        self.config = config
        self.max_waiting_requests = max_waiting_requests
        self.chat_template = chat_template  # replaces the model's when given
        self.model_info: ModelInfo | None = None
        self.tokenizer: Any = None
        self.metrics: ServerMetrics | None = None
        self.ready = False
        self.dead_reason: str | None = None
        self.stats = SchedulerStats()
        # Tools, reasoning and structured outputs (--tool-call-parser, ...; set by the CLI).
        self.agent_options = AgentOptions()
        self.grammar_compiler: Any = None  # built on the first constrained request
        self.core = EngineCoreClient(config)
        self._tracked: dict[str, _Tracked] = {}
        self._pooling: dict[str, asyncio.Future[PoolingOutput]] = {}  # embed/score inputs
        self._processor: OutputProcessor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._num_sent = 0  # requests handed to the sender
        self._num_received = 0  # requests the core has taken in (its last EngineCoreOutputs)
        self._closing = False
        self.crashed = False  # the core died while serving (not a shutdown we asked for)
        self.on_fatal: Callable[[], None] | None = None  # called once the core has died
        self.max_token_chars = 1  # characters of the longest vocabulary entry
        # Encoding and decoding only read the tokenizer (no truncation or padding is ever set),
        # so the threads share it.
        self._tokenizer_pool = ThreadPoolExecutor(TOKENIZER_WORKERS, thread_name_prefix="tokenizer")
        self._tokenizer_jobs = 0

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn the core and, while it loads the model, load the tokenizer here."""
        from soberana.models.tokenizer import load_tokenizer

        t0 = time.perf_counter()
        self._loop = asyncio.get_running_loop()
        pid = self.core.start()
        logger.info("engine core process started (pid %d); loading the model", pid)
        early = self._loop.run_in_executor(None, _load_tokenizer_early, self.config)
        try:
            model_info = await self._loop.run_in_executor(None, self.core.wait_ready)
        except EngineDeadError as exc:
            self.dead_reason = str(exc)
            early.cancel()
            raise
        logger.info("engine core ready in %.1fs", time.perf_counter() - t0)
        try:
            path, tokenizer = await early
        except ValueError:
            path, tokenizer = None, None  # the core resolved the model another way: retry below
        if path != Path(model_info.path):
            t_tok = time.perf_counter()
            tokenizer = await self._loop.run_in_executor(None, load_tokenizer,
                                                         Path(model_info.path))
            logger.info("tokenizer loaded in %.1fs", time.perf_counter() - t_tok)
        if self.chat_template is not None:
            tokenizer.chat_template = self.chat_template
        self._attach(model_info, tokenizer)
        loop = self._loop
        self.core.run_io(lambda batch: loop.call_soon_threadsafe(self._on_messages, batch))
        self.ready = True

    def _attach(self, model_info: ModelInfo, tokenizer: Any) -> None:
        """Take the core's model description and the tokenizer; set up the per-token state."""
        from soberana.engine.output_processor import OutputProcessor

        self.model_info = model_info
        self.tokenizer = tokenizer
        self.max_token_chars = max((len(t) for t in tokenizer.get_vocab()), default=1)
        self._processor = OutputProcessor(tokenizer)
        # model_info.name is the first --served-model-name, else the model's own name.
        self.metrics = ServerMetrics(model_info.name, model_info.max_model_len, {
            "block_size": str(self.config.block_size),
            "gpu_memory_utilization": str(self.config.gpu_memory_utilization),
            "enable_prefix_caching": str(self.config.enable_prefix_caching),
            "cache_dtype": "auto",
        })
        # Everything built so far (torch, transformers, the tokenizer, the app: ~400k objects)
        # lives as long as the process. Frozen, it is no longer walked by every full garbage
        # collection, each of which otherwise stops the event loop, and every stream, for
        # ~0.2 s on a busy CPU (vLLM's API server does the same).
        gc.collect()
        gc.freeze()

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the core: ask politely, then kill it if it does not exit within `timeout`."""
        self.ready = False
        self._closing = True
        if not self.core.started:
            return
        await asyncio.get_running_loop().run_in_executor(None, self.core.stop, timeout)
        for tracked in self._tracked.values():
            tracked.stream.fail(EngineDeadError("the server is shutting down"))
        self._tracked.clear()
        self._fail_pooling(EngineDeadError("the server is shutting down"))
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    def fail_all(self, error: EngineDeadError) -> int:
        """End every in-flight request with `error` (and abort it in the core); later requests
        get it too. Returns how many were ended."""
        self.ready = False
        self.dead_reason = str(error)
        if self._processor is None:
            return 0  # never started: nothing in flight
        ids = list(self._tracked)
        for request_id in ids:
            tracked = self._tracked.pop(request_id)
            self._processor.abort_request(request_id)
            tracked.stream.fail(error)
        if ids:
            self.core.send(AbortRequests(ids))
        ended = len(ids) + len(self._pooling)
        self._fail_pooling(error)
        return ended

    # ---- requests ---------------------------------------------------------------------------

    async def run_tokenizer(self, num_chars: int, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` (chat template, tokenization, decoding) over `num_chars` characters of
        text: on the event loop when short, else on the bounded tokenizer pool, so that a long
        prompt (~40 ms per 100k characters) does not stall every other stream meanwhile.

        Cancelling the caller (its client left) drops a job that has not started yet."""
        if num_chars < OFFLOAD_TOKENIZATION_CHARS:
            return fn(*args)
        if self._tokenizer_jobs >= MAX_TOKENIZER_JOBS:
            raise QueueFullError(
                f"the server is tokenizing {self._tokenizer_jobs} long prompts "
                f"(limit {MAX_TOKENIZER_JOBS}); retry later"
            )
        loop = asyncio.get_running_loop()
        self._tokenizer_jobs += 1
        try:
            return await loop.run_in_executor(self._tokenizer_pool, functools.partial(fn, *args))
        finally:
            self._tokenizer_jobs -= 1

    def num_waiting(self) -> int:
        """Requests in the core's waiting queue, plus those on their way that will find no
        free running slot (as of the core's last report)."""
        in_transit = self._num_sent - self._num_received
        free_slots = max(0, self.config.max_num_seqs - self.stats.num_running_reqs)
        return self.stats.num_waiting_reqs + max(0, in_transit - free_slots)

    def check_capacity(self, num_requests: int) -> None:
        """Raise QueueFullError when `num_requests` more would pass --max-waiting-requests."""
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        if self.num_waiting() + num_requests > self.max_waiting_requests:
            raise QueueFullError(
                f"the server has {self.num_waiting()} requests waiting "
                f"(limit {self.max_waiting_requests}); retry later"
            )

    def add_request(
        self,
        request_id: str,
        prompt_text: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        streaming: bool,
        priority: int = 0,
        cache_salt: str | None = None,
        arrival_time: float | None = None,
    ) -> RequestStream:
        """Send one request to the core and return the stream its outputs will arrive on."""
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        arrival = time.time() if arrival_time is None else arrival_time
        stream = RequestStream(request_id, streaming)
        # A handler that does not stream needs only the end result: one output, not one per step.
        self._processor.add_request(
            request_id, prompt_text, prompt_token_ids, params, delta=True, arrival_time=arrival,
            final_only=not streaming,
        )
        times = RequestTimes(arrival, len(prompt_token_ids), params.n, params.max_tokens or 0)
        self._tracked[request_id] = _Tracked(stream, times, params.n)
        self._num_sent += 1
        self.core.send(
            EngineCoreRequest(request_id, prompt_token_ids, params, arrival, priority, cache_salt)
        )
        return stream

    def add_pooling_request(
        self, request_id: str, token_ids: list[int], token_type_ids: list[int] | None = None
    ) -> asyncio.Future[PoolingOutput]:
        """Send one embedding/scoring input to the core; the future resolves with its result."""
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        assert self._loop is not None
        future: asyncio.Future[PoolingOutput] = self._loop.create_future()
        self._pooling[request_id] = future
        self._num_sent += 1
        self.core.send(PoolingRequest(request_id, token_ids, time.time(), token_type_ids))
        return future

    def abort_pooling(self, request_ids: list[str]) -> None:
        """Drop inputs whose client has gone (those still queued in the core are skipped)."""
        gone = [r for r in request_ids if self._pooling.pop(r, None) is not None]
        if gone:
            self.core.send(AbortRequests(list(gone)))

    def abort(self, request_id: str) -> None:
        """Stop a request (client gone, shutdown): the core frees its KV blocks at once."""
        tracked = self._tracked.pop(request_id, None)
        if tracked is None:
            return  # already finished
        self.core.send(AbortRequests([request_id]))
        self._processor.abort_request(request_id)
        assert self.metrics is not None
        self.metrics.record_finished(tracked.times, time.time(), ["abort"] * len(tracked.unfinished))
        note_finished(tracked.record, tracked.times, ["abort"] * len(tracked.unfinished), 0)

    # ---- dispatch (event loop) --------------------------------------------------------------

    def _on_messages(self, batch: list[FromCore]) -> None:
        steps = [m for m in batch if isinstance(m, EngineCoreOutputs)]
        if steps:
            self._on_steps(steps)
        if isinstance(batch[-1], CoreFatal):
            self._on_fatal(batch[-1].message)

    def _on_steps(self, steps: list[EngineCoreOutputs]) -> None:
        assert self.metrics is not None
        last = steps[-1]
        for step in steps:
            self.metrics.record_iteration(self.stats, step.stats)
            self.stats = step.stats
        self._num_received = last.num_received
        self.metrics.record_scheduler_stats(last.stats)
        outputs = []
        generated = 0
        for step in steps:
            self._on_pooled(step)
            for request_id, reason in step.rejected:
                tracked = self._tracked.pop(request_id, None)
                if tracked is not None:
                    self._processor.abort_request(request_id)
                    tracked.stream.fail(EngineRejectedError(reason))
            for out in step.outputs:
                generated += len(out.new_token_ids)
                tracked = self._tracked.get(out.request_id)
                if tracked is not None:
                    self.metrics.record_tokens(
                        tracked.times, step.timestamp, len(out.new_token_ids), out.scheduled_time,
                        out.index,
                    )
            outputs += step.outputs
        if not outputs:
            return
        self.metrics.generation_tokens.inc(generated)
        request_outputs, ids_to_abort = self._processor.process_outputs(outputs)
        if ids_to_abort:
            self.core.send(AbortRequests(list(ids_to_abort)))
        for output in request_outputs:
            tracked = self._tracked.get(output.request_id)
            if tracked is None:
                continue  # aborted while these steps ran
            reasons = []
            for sample in output.outputs:
                if sample.finish_reason is not None and sample.index in tracked.unfinished:
                    tracked.unfinished.discard(sample.index)
                    reasons.append(sample.finish_reason)
            if output.finished:
                del self._tracked[output.request_id]
                reasons += ["abort"] * len(tracked.unfinished)
                self.metrics.record_finished(tracked.times, last.timestamp, reasons)
                note_finished(tracked.record, tracked.times, reasons, output.num_cached_tokens)
            elif reasons:
                self.metrics.record_samples_finished(reasons)
            tracked.stream.put(output)

    def _on_pooled(self, step: EngineCoreOutputs) -> None:
        for out in step.pooled:
            future = self._pooling.pop(out.request_id, None)
            if future is not None and not future.done():
                future.set_result(out)
        for request_id, reason in step.rejected:
            future = self._pooling.pop(request_id, None)
            if future is not None and not future.done():
                future.set_exception(EngineRejectedError(reason))

    def _fail_pooling(self, error: Exception) -> None:
        for future in self._pooling.values():
            if not future.done():
                future.set_exception(error)
        self._pooling.clear()

    def _on_fatal(self, reason: str) -> None:
        if self._closing:
            return
        self.ready = False
        self.dead_reason = reason
        self.crashed = True
        logger.error("engine core failed; failing %d in-flight requests and exiting: %s",
                     len(self._tracked), reason)
        for tracked in self._tracked.values():
            if self.metrics is not None:
                errors = ["error"] * len(tracked.unfinished)
                self.metrics.record_finished(tracked.times, time.time(), errors)
            note_finished(tracked.record, tracked.times, ["error"] * len(tracked.unfinished), 0)
            tracked.stream.fail(EngineDeadError(reason))
        self._tracked.clear()
        self._fail_pooling(EngineDeadError(reason))
        if self.on_fatal is not None:
            self.on_fatal()


def _load_tokenizer_early(config: EngineConfig) -> tuple[Path, Any]:
    """The tokenizer of a local model (a directory, a .gguf file, the demo), loaded while the
    core loads the weights; ValueError for a hub id or the default model, which the core may
    have to download first."""
    from soberana.models.loader import DEMO_ALIASES, resolve_model_path
    from soberana.models.tokenizer import load_tokenizer

    if config.model is None or (config.model not in DEMO_ALIASES
                                and not Path(config.model).expanduser().exists()):
        raise ValueError("not a local model")
    t0 = time.perf_counter()
    path = resolve_model_path(config.model, config.revision)
    tokenizer = load_tokenizer(path)
    logger.info("tokenizer loaded in %.1fs (while the engine loads)", time.perf_counter() - t0)
    return path, tokenizer
