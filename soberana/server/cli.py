"""`soberana serve [MODEL]`: arguments, then the HTTP server and the engine-core process."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from soberana.config_file import add_config_flag
from soberana.config_flags import HelpFormatter, add_flags, from_flags
from soberana.engine.config import EngineConfig
from soberana.kv.config import add_arguments as add_kv_arguments
from soberana.kv.config import config_from_args as kv_config_from_args
from soberana.log import LoggingConfig
from soberana.server.agent_request import AgentOptions
from soberana.server.app import ServerSettings, build_app
from soberana.server.engine_client import EngineClient, ServerShuttingDownError
from soberana.server.request_log import filter_access_log
from soberana.server.serve_config import ServeConfig
from soberana.server.stats_log import log_engine_stats
from soberana.telemetry.collector import GPUCollector
from soberana.telemetry.monitor import TelemetryMonitor, process_tree
from soberana.tenant_salt import load_salt_secret
from soberana.tracing import Tracing, from_endpoint

logger = logging.getLogger("soberana.server")

# Probes and scrapers call these every few seconds: no access line for them.
_QUIET_PATHS = ("/health", "/metrics")
# Past --shutdown-timeout, requests are ended with an error; uvicorn's own hard stop follows
# this much later, for responses that still would not finish.
_HARD_STOP_AFTER_S = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `soberana serve`, generated from the fields of its configuration dataclasses
    (vLLM's names where vLLM has one); `--config FILE.yaml` sets them from a file."""
    parser.formatter_class = HelpFormatter
    add_flags(parser, EngineConfig, only=("model",))  # the positional MODEL
    add_config_flag(parser)
    http = parser.add_argument_group("HTTP server")
    add_flags(http, ServeConfig)
    add_flags(http, LoggingConfig)
    add_flags(parser.add_argument_group("tools, reasoning and structured outputs"), AgentOptions)
    add_flags(parser.add_argument_group("engine"), EngineConfig, skip=("model",))
    add_kv_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT (exit 0 after draining) or an engine start failure (exit 1)."""
    serve = from_flags(ServeConfig, args)
    if serve.data_parallel_size != 1:  # a launcher of replicas, not a server itself
        from soberana.distributed.data_parallel import run_replicas

        return run_replicas(args)
    from_flags(LoggingConfig, args).configure()
    filter_access_log(_QUIET_PATHS)
    try:
        kv_warehouse = kv_config_from_args(args)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    config = from_flags(
        EngineConfig, args,
        served_model_name=serve.served_model_name[0] if serve.served_model_name else None,
        kv_warehouse=kv_warehouse if kv_warehouse.enabled() else None,
    )
    try:
        config.validate()
        serve.validate()
        salt_secret = load_salt_secret(serve.tenant_salt_secret_file)
        agent_options = from_flags(AgentOptions, args)
        agent_options.validate()
        chat_template = _read_chat_template(serve.chat_template)
        tracing = from_endpoint("soberana-server", serve.otlp_traces_endpoint)
        sock = _bind(serve.host, serve.port)
    except (ValueError, OSError) as exc:
        logger.error("%s", exc)
        return 2
    if config.model is None:
        from soberana.models.default_model import DEFAULT_MODEL

        logger.info("No MODEL given: serving the default model %s (`soberana serve demo` for the "
                    "random-weights demo, `soberana serve PATH` for another model)", DEFAULT_MODEL)
    elif config.model in ("demo", "soberana-demo"):
        from soberana.models.demo import DEMO_NAME, LABEL

        logger.warning("Serving the built-in demo model %r (%s); its answers are meaningless. "
                       "To serve a real model: `soberana serve` (the default model, "
                       "SmolLM2-135M-Instruct) or `soberana serve /path/to/model`.",
                       DEMO_NAME, LABEL)  # fmt: skip
    try:
        return _event_loop_runner()(
            _serve(serve, config, agent_options, chat_template, sock, salt_secret, tracing)
        )
    finally:
        if tracing is not None:
            tracing.shutdown()


async def _serve(
    serve: ServeConfig,
    config: EngineConfig,
    agent_options: AgentOptions,
    chat_template: str | None,
    sock: socket.socket,
    salt_secret: bytes,
    tracing: Tracing | None = None,
) -> int:
    t0 = time.perf_counter()
    engine = EngineClient(config, serve.max_waiting_requests, chat_template)
    # GPU telemetry on this server's /metrics; Soberana's processes are this one and its children.
    telemetry = TelemetryMonitor(own_pids=process_tree, threshold=config.gpu_memory_utilization)
    telemetry.start()  # a daemon thread: it ends with the process
    settings = ServerSettings(
        served_model_names=serve.served_model_name,
        api_keys=serve.api_keys(),
        tenant_header=serve.tenant_header,
        salt_secret=salt_secret,
        allowed_origins=serve.allowed_origins,
        max_request_body_bytes=int(serve.max_request_body_mb * 2**20),
        gpu_telemetry=GPUCollector(telemetry) if telemetry.available else None,
        tracing=tracing,
    )
    engine.agent_options = agent_options
    app = build_app(engine, settings)
    server = _Server(
        uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
            access_log=not serve.disable_uvicorn_access_log,
            timeout_graceful_shutdown=serve.shutdown_timeout + _HARD_STOP_AFTER_S,
        ),
        engine,
        serve.shutdown_timeout,
    )
    # A dead engine core ends the server (exit 1) once in-flight requests have their error, so
    # a supervisor restarts it instead of a replica answering 503 forever.
    engine.on_fatal = server.stop
    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}"
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    logger.info("listening on %s; /health answers 503 until the engine is ready", url)
    starting = asyncio.create_task(engine.start())
    await asyncio.wait({serving, starting}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # SIGTERM/SIGINT before the engine came up
        await engine.shutdown()
        starting.cancel()
        return 0
    if starting.exception() is not None:
        logger.error("engine failed to start: %s", starting.exception())
        server.should_exit = True
        await serving
        await engine.shutdown()
        return 1
    info = engine.model_info
    logger.info(
        "ready: serving %s (max_model_len %d, %s, %s) at %s/v1; start-up took %.1fs",
        ", ".join(serve.served_model_name or [info.name]),
        info.max_model_len,
        info.device,
        info.dtype,
        url,
        time.perf_counter() - t0,
    )
    if serve.stats_log_interval > 0:
        stats_logging = asyncio.create_task(log_engine_stats(engine, serve.stats_log_interval))
        serving.add_done_callback(lambda _: stats_logging.cancel())
    await serving
    if engine.crashed:
        logger.error("exiting with code 1: the engine core died (%s)",
                     (engine.dead_reason or "").splitlines()[0])
        await engine.shutdown(timeout=5)
        return 1
    logger.info("HTTP server stopped; stopping the engine")
    await engine.shutdown()
    return 0


class _Server(uvicorn.Server):
    """uvicorn, except that a drained SIGTERM ends with exit code 0, and requests still
    running at --shutdown-timeout end with an OpenAI error rather than a cut connection.

    uvicorn re-raises the caught signal after its graceful shutdown, so the process would
    die of it (exit -15) even though every request finished.
    """

    def __init__(self, config: uvicorn.Config, engine: EngineClient, drain_s: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.drain_s = drain_s

    def stop(self) -> None:
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        timer = asyncio.get_running_loop().call_later(self.drain_s, self._drain_timed_out)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    def _drain_timed_out(self) -> None:
        error = ServerShuttingDownError(
            f"the server is shutting down and this request did not finish within "
            f"--shutdown-timeout {self.drain_s:g}s"
        )
        ended = self.engine.fail_all(error)
        if ended:
            logger.warning("--shutdown-timeout %gs passed: ended %d running requests with an error",
                           self.drain_s, ended)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _event_loop_runner():
    """uvloop's runner where installed (a faster event loop and socket I/O), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


def _bind(host: str, port: int) -> socket.socket:
    """Bind before the engine loads, so the port (even 0) is known and logged at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def _read_chat_template(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    if "{" not in value:
        raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    return value

