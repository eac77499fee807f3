"""`soberana serve [MODEL]`: arguments, then the HTTP server and the engine-core process."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from soberana.engine.config import EngineConfig
from soberana.kv.config import add_arguments as add_kv_arguments
from soberana.kv.config import config_from_args as kv_config_from_args
from soberana.log import LOG_FORMATS
from soberana.log import configure as configure_logging
from soberana.server.agent_options import add_agent_arguments, agent_options_from_args
from soberana.server.app import ServerSettings, build_app
from soberana.server.engine_client import EngineClient, ServerShuttingDownError
from soberana.server.request_log import filter_access_log
from soberana.server.stats_log import log_engine_stats
from soberana.telemetry.collector import GPUCollector
from soberana.telemetry.monitor import TelemetryMonitor, process_tree
from soberana.tenant_salt import load_salt_secret
from soberana.tracing import Tracing, from_endpoint

logger = logging.getLogger("soberana.server")

# Probes and scrapers call these every few seconds: no access line for them.
_QUIET_PATHS = ("/health", "/metrics")
DEVICES = "auto, cpu, cuda or cuda:N"
DTYPES = ("auto", "float32", "float16", "bfloat16")
# Past --shutdown-timeout, requests are ended with an error; uvicorn's own hard stop follows
# this much later, for responses that still would not finish.
_HARD_STOP_AFTER_S = 10.0


class _HelpFormatter(argparse.HelpFormatter):
    """Appends each flag's default to its help, unless the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "default" in text
            or action.default in (None, argparse.SUPPRESS, False)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


def device_arg(value: str) -> str:
    """`--device`: checked while parsing, so an unsupported device fails at once."""
    if value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", value):
        return value
    raise argparse.ArgumentTypeError(f"unsupported device {value!r}: choose {DEVICES}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `soberana serve` (vLLM's names where vLLM has one)."""
    parser.formatter_class = _HelpFormatter
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="a local Hugging Face model directory, a .gguf file, a hub id, or 'demo' (random "
        "weights); omit for the default model, SmolLM2-135M-Instruct",
    )
    http = parser.add_argument_group("HTTP server")
    http.add_argument("--host", default="127.0.0.1", help="address to bind")
    http.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one")
    http.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="require 'Authorization: Bearer KEY' on the API; repeat for several tenants, each "
        "key one tenant whose KV cache no other tenant can reuse (default $SOBERANA_API_KEY)",
    )
    http.add_argument(
        "--tenant-header",
        default=None,
        help="header naming a sub-tenant within the tenant of the request's API key (e.g. "
        "X-Tenant-Id, set by a gateway in front); needs --api-key. Requests of different "
        "tenants never share KV blocks",
    )
    http.add_argument(
        "--tenant-salt-secret-file",
        default=None,
        help="file holding the secret (>= 16 bytes) that keys tenants' KV cache salts "
        "(HMAC-SHA256); default $SOBERANA_TENANT_SALT_SECRET_FILE, $SOBERANA_TENANT_SALT_SECRET, "
        "else random per process (no reuse of tenant-salted blocks across restarts/replicas)",
    )
    http.add_argument(
        "--allowed-origins",
        action="append",
        default=None,
        help="an origin allowed to call the API from a browser (CORS), e.g. "
        "https://app.example.org, or '*'; repeat for several; default: none",
    )
    http.add_argument(
        "--max-request-body-mb",
        type=float,
        default=32.0,
        help="answer 413 to a request body larger than this many MiB, before reading it",
    )
    http.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="name(s) clients use for the model (default: MODEL as given, or soberana-demo)",
    )
    http.add_argument(
        "--chat-template",
        default=None,
        help="Jinja chat template (a file path or the template itself) replacing the model's",
    )
    http.add_argument(
        "--max-waiting-requests",
        type=int,
        default=1024,
        help="answer 429 with Retry-After when more requests than this wait for the engine",
    )
    http.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds to let running requests finish; the rest then end with an "
        "OpenAI error (JSON 503, or an SSE error event then [DONE])",
    )
    http.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"],
        help="least severe log level printed",
    )
    http.add_argument(
        "--log-format", default="text", choices=list(LOG_FORMATS),
        help="text, or json: one JSON object per line (request lines carry their fields as keys)",
    )
    http.add_argument(
        "--otlp-traces-endpoint", default=None,
        help="send OpenTelemetry spans (request, queue, prefill, decode) over OTLP/HTTP to this "
        "collector URL, e.g. http://localhost:4318; default: no tracing",
    )
    http.add_argument(
        "--stats-log-interval", type=float, default=10.0,
        help="seconds between engine statistics lines (running, waiting, KV use, tok/s); 0: none",
    )
    http.add_argument(
        "--disable-uvicorn-access-log", action="store_true", help="do not log every request"
    )
    add_agent_arguments(parser)
    eng = parser.add_argument_group("engine")
    defaults = EngineConfig()
    eng.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    eng.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache size in GB")
    eng.add_argument(
        "--gpu-memory-utilization", type=float, default=defaults.gpu_memory_utilization,
        help="share of GPU memory the engine may use (weights, KV cache, activations)",
    )
    eng.add_argument(
        "--max-num-seqs", type=int, default=defaults.max_num_seqs,
        help="most sequences in one engine step (the running batch)",
    )
    eng.add_argument(
        "--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens,
        help="token budget of one engine step (prefill chunks plus decodes)",
    )
    eng.add_argument(
        "--long-prefill-token-threshold", type=int, default=defaults.long_prefill_token_threshold,
        help="a prefill longer than this advances at most this many tokens per step, so "
        "shorter prompts are not held behind it (default 0: no limit)",
    )
    eng.add_argument(
        "--block-size", type=int, default=defaults.block_size, help="tokens per KV cache block"
    )
    eng.add_argument("--dtype", default=defaults.dtype, choices=DTYPES, help="weight and KV dtype")
    eng.add_argument("--device", default=defaults.device, type=device_arg, help=DEVICES)
    eng.add_argument(
        "--compute-backend", default=defaults.compute_backend,
        choices=["auto", "torch", "native", "triton"],
        help="which implementations serve the ops, chosen once at start and shown in "
        "/v1/models (auto: Triton on GPUs, native kernels on CPUs; torch: portable PyTorch)",
    )
    eng.add_argument(
        "--cpu-isa", default=defaults.cpu_isa, choices=["native", "avx2", "portable"],
        help="CPU: instruction sets of the native kernels (native: this CPU's; avx2: the path of "
        "CPUs without AVX-512; portable: plain C)",
    )
    eng.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed of the engine's random generator"
    )
    eng.add_argument("--revision", default=None, help="hub revision of MODEL")
    eng.add_argument(
        "--max-logprobs", type=int, default=defaults.max_logprobs,
        help="most logprobs a request may ask for per token",
    )
    eng.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=defaults.enable_prefix_caching,
        help="reuse the KV blocks of prompt prefixes already computed",
    )
    eng.add_argument("--enforce-eager", action="store_true", help="GPU: no CUDA graphs")
    eng.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="prepare step N+1 on the host while the device runs step N (default: on for GPUs)",
    )
    eng.add_argument(
        "--load-format",
        choices=["safetensors", "dummy"],
        default="safetensors",
        help="dummy: random weights in the model's shape (performance runs without a checkpoint)",
    )
    eng.add_argument(
        "--task",
        choices=["auto", "generate", "embed", "rerank"],
        default="auto",
        help="what the model serves: generate (chat/completions), embed (/v1/embeddings, "
        "/v1/score, /v1/rerank by cosine) or rerank (a cross-encoder: /v1/rerank, /v1/score); "
        "auto follows the checkpoint's architecture (default auto)",
    )
    eng.add_argument(
        "--tensor-parallel-size", type=int, default=1,
        help="split each layer by heads over this many GPUs (worker processes; gloo on CPUs)",
    )
    eng.add_argument(
        "--data-parallel-size", type=int, default=1,
        help="start this many replicas on ports --port, --port+1, ... and print a gateway "
             "config routing over them (docs/distributed.md)",
    )
    eng.add_argument(
        "--speculative-config", default=None,
        help='speculative decoding, vLLM\'s JSON: {"method": "ngram", '
        '"num_speculative_tokens": 4} or "draft_model" with "model": PATH, or "layer_skip" '
        '(docs/spec-decode.md)',
    )
    eng.add_argument(
        "--quantization", "-q", choices=["int8", "int4", "fp8"], default=None,
        help="quantize the weights at load: int8 / int4 weight-only, fp8 W8A8 (GPUs of compute "
        "capability >= 8.9; weight-only elsewhere). A pre-quantized compressed-tensors "
        "checkpoint is detected without this flag",
    )
    eng.add_argument(
        "--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
        help="fp8: store keys and values as float8_e4m3fn (twice the tokens in the pool)",
    )
    add_kv_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT (exit 0 after draining) or an engine start failure (exit 1)."""
    if args.data_parallel_size != 1:  # a launcher of replicas, not a server itself
        from soberana.distributed.data_parallel import run_replicas

        return run_replicas(args)
    configure_logging(args.log_format, args.log_level)
    filter_access_log(_QUIET_PATHS)
    try:
        kv_warehouse = kv_config_from_args(args)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    config = EngineConfig(
        model=args.model,
        dtype=args.dtype,
        cpu_isa=args.cpu_isa,
        compute_backend=args.compute_backend,
        device=args.device,
        max_model_len=args.max_model_len,
        kv_cache_gb=args.kv_cache_gb,
        gpu_memory_utilization=args.gpu_memory_utilization,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        long_prefill_token_threshold=args.long_prefill_token_threshold,
        enable_prefix_caching=args.enable_prefix_caching,
        seed=args.seed,
        served_model_name=args.served_model_name[0] if args.served_model_name else None,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        revision=args.revision,
        max_logprobs=args.max_logprobs,
        enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling,
        load_format=args.load_format,
        task=args.task,
        tensor_parallel_size=args.tensor_parallel_size,
        kv_warehouse=kv_warehouse if kv_warehouse.enabled() else None,
        speculative_config=args.speculative_config,
    )
    try:
        config.validate()
        if args.max_waiting_requests < 1:
            raise ValueError(f"--max-waiting-requests must be >= 1; got {args.max_waiting_requests}")
        if args.shutdown_timeout < 0:
            raise ValueError(f"--shutdown-timeout must be >= 0; got {args.shutdown_timeout}")
        if args.max_request_body_mb <= 0:
            raise ValueError(f"--max-request-body-mb must be > 0; got {args.max_request_body_mb}")
        if args.tenant_header and not _api_keys(args):
            raise ValueError("--tenant-header needs --api-key: the header only names sub-tenants "
                             "within the tenant of the key that sent the request")
        salt_secret = load_salt_secret(args.tenant_salt_secret_file)
        agent_options_from_args(args).validate()
        chat_template = _read_chat_template(args.chat_template)
        tracing = from_endpoint("soberana-server", args.otlp_traces_endpoint)
        sock = _bind(args.host, args.port)
    except (ValueError, OSError) as exc:
        logger.error("%s", exc)
        return 2
    if args.model is None:
        from soberana.models.default_model import DEFAULT_MODEL

        logger.info("No MODEL given: serving the default model %s (`soberana serve demo` for the "
                    "random-weights demo, `soberana serve PATH` for another model)", DEFAULT_MODEL)
    elif args.model in ("demo", "soberana-demo"):
        from soberana.models.demo import DEMO_NAME, LABEL

        logger.warning("Serving the built-in demo model %r (%s); its answers are meaningless. "
                       "To serve a real model: `soberana serve` (the default model, "
                       "SmolLM2-135M-Instruct) or `soberana serve /path/to/model`.",
                       DEMO_NAME, LABEL)  # fmt: skip
    try:
        return _event_loop_runner()(
            _serve(args, config, chat_template, sock, salt_secret, tracing)
        )
    finally:
        if tracing is not None:
            tracing.shutdown()


async def _serve(
    args: argparse.Namespace,
    config: EngineConfig,
    chat_template: str | None,
    sock: socket.socket,
    salt_secret: bytes,
    tracing: Tracing | None = None,
) -> int:
    t0 = time.perf_counter()
    engine = EngineClient(config, args.max_waiting_requests, chat_template)
    # GPU telemetry on this server's /metrics; Soberana's processes are this one and its children.
    telemetry = TelemetryMonitor(own_pids=process_tree, threshold=config.gpu_memory_utilization)
    telemetry.start()  # a daemon thread: it ends with the process
    settings = ServerSettings(
        served_model_names=args.served_model_name,
        api_keys=_api_keys(args),
        tenant_header=args.tenant_header,
        salt_secret=salt_secret,
        allowed_origins=args.allowed_origins,
        max_request_body_bytes=int(args.max_request_body_mb * 2**20),
        gpu_telemetry=GPUCollector(telemetry) if telemetry.available else None,
        tracing=tracing,
    )
    engine.agent_options = agent_options_from_args(args)
    app = build_app(engine, settings)
    server = _Server(
        uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
            access_log=not args.disable_uvicorn_access_log,
            timeout_graceful_shutdown=args.shutdown_timeout + _HARD_STOP_AFTER_S,
        ),
        engine,
        args.shutdown_timeout,
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
        ", ".join(args.served_model_name or [info.name]),
        info.max_model_len,
        info.device,
        info.dtype,
        url,
        time.perf_counter() - t0,
    )
    if args.stats_log_interval > 0:
        stats_logging = asyncio.create_task(log_engine_stats(engine, args.stats_log_interval))
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


def _api_keys(args: argparse.Namespace) -> list[str] | None:
    keys = args.api_key or ([os.environ["SOBERANA_API_KEY"]]
                            if os.environ.get("SOBERANA_API_KEY") else None)
    return keys
