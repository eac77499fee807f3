"""The engine-core process: its loop and the typed messages it exchanges with the API process.

API → core (`ToCore`): `EngineCoreRequest`, `PoolingRequest`, `AbortRequests`, `Shutdown`.
Core → API (`FromCore`): `CoreReady` once, then one `EngineCoreOutputs` per loop turn that did
work, or `CoreFatal`. Every message is a dataclass of plain data (pickled over a pipe); the
client's side is `engine/core_client.py`.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from soberana.engine.config import EngineConfig
from soberana.engine.outputs import (
    EngineCoreOutput,
    EngineCoreRequest,
    ModelInfo,
    PoolingOutput,
    PoolingRequest,
    SchedulerStats,
)
from soberana.log import configure

if TYPE_CHECKING:  # the API process imports this module and must not load torch for it
    from soberana.engine.core import EngineCore
    from soberana.engine.pooling_core import PoolingCore

logger = logging.getLogger("soberana.engine_core")


@dataclass
class AbortRequests:
    """Whole requests by id, or single samples as (request_id, index) (stop strings)."""

    request_ids: list[str | tuple[str, int]]


@dataclass
class Shutdown:
    pass


@dataclass
class CoreReady:
    """The core has loaded its model and serves from now on."""

    model_info: ModelInfo


@dataclass
class EngineCoreOutputs:
    """Everything one loop turn produced (vLLM's name); `num_received` counts requests taken
    in so far."""

    outputs: list[EngineCoreOutput]
    stats: SchedulerStats
    num_received: int
    timestamp: float  # time.time() when the step ended: token latencies are measured here
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (request_id, reason)
    pooled: list[PoolingOutput] = field(default_factory=list)  # an embedding/rerank core's results


@dataclass
class CoreFatal:
    """The core failed (to start, or while serving); it exits after sending this."""

    message: str


ToCore = EngineCoreRequest | PoolingRequest | AbortRequests | Shutdown
FromCore = CoreReady | EngineCoreOutputs | CoreFatal


def run_engine_core(config: EngineConfig, requests: Connection, results: Connection) -> None:
    """Entry point of the engine-core process (spawned): build the core, then serve the loop."""
    # Ctrl-C and a process-group SIGTERM reach us too; the API process decides when we stop
    # (it drains first), and we also stop when its end of the pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The API process's --log-format (it exports SOBERANA_LOG_FORMAT before spawning us).
    configure(os.environ.get("SOBERANA_LOG_FORMAT", "text"), "INFO")
    try:
        # This process is ours: tune its allocator before torch is imported (and allocates).
        from soberana.engine.process_memory import prefer_passive_openmp, tune_process_memory

        t0 = time.perf_counter()
        if _serves_pooling(config):
            prefer_passive_openmp()
        tune_process_memory()
        from soberana.engine.pooling_core import build_engine_core

        logger.info("engine core: libraries imported in %.1fs; loading the model",
                    time.perf_counter() - t0)
        core = build_engine_core(config)
    except BaseException as exc:
        results.send(CoreFatal(f"engine core failed to start: {exc!r}\n{traceback.format_exc()}"))
        return
    results.send(CoreReady(core.model_info))
    try:
        _loop(core, requests, results)
    except (EOFError, OSError):
        return  # the API process is gone
    except BaseException as exc:
        try:
            results.send(CoreFatal(f"engine core failed: {exc!r}\n{traceback.format_exc()}"))
        except OSError:
            pass
        raise SystemExit(1) from exc
    finally:
        core.shutdown()  # stops tensor-parallel workers and the warehouse's threads


def _serves_pooling(config: EngineConfig) -> bool:
    """Whether this core will embed or score (before torch is imported: config.json only; a
    decoder embedder chosen by `auto` is missed, which costs speed, not correctness)."""
    from pathlib import Path

    from soberana.models.encoder_config import is_encoder_dir

    if config.task in ("embed", "rerank"):
        return True
    return (config.task == "auto" and config.model is not None
            and is_encoder_dir(Path(config.model)))  # fmt: skip


def _loop(core: EngineCore | PoolingCore, requests: Connection, results: Connection) -> None:
    num_received = 0
    pooling = core.model_info.task != "generate"
    pooled: list[PoolingOutput] = []
    while True:
        if not core.has_unfinished_requests():
            requests.poll(None)  # idle: sleep until the API process sends something
        rejected: list[tuple[str, str]] = []
        # Take in everything that arrived, without waiting, before scheduling the next step.
        while requests.poll(0):
            message: ToCore = requests.recv()
            if isinstance(message, EngineCoreRequest | PoolingRequest):
                num_received += 1
                try:
                    core.add_request(message)
                except ValueError as exc:
                    rejected.append((message.request_id, str(exc)))
            elif isinstance(message, AbortRequests):
                core.abort_requests(message.request_ids)
            elif isinstance(message, Shutdown):
                return
        outputs = core.step() if core.has_unfinished_requests() else []
        if pooling:  # an embedding/rerank core: every output is a finished PoolingOutput
            outputs, pooled = [], outputs
        results.send(EngineCoreOutputs(outputs, core.get_stats(), num_received, time.time(),
                                       rejected, pooled))
