"""`soberana serve [MODEL]`: arguments, then the HTTP server and the engine-core process."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from soberana.engine.config import EngineConfig
from soberana.kv.config import add_arguments as add_kv_arguments
from soberana.kv.config import config_from_args as kv_config_from_args
from soberana.server.app import ServerSettings, build_app
from soberana.server.engine_client import EngineClient

logger = logging.getLogger("soberana.server")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `soberana serve` (vLLM's names where vLLM has one)."""
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="local Hugging Face model directory or hub id; omit for the built-in demo model",
    )
    http = parser.add_argument_group("HTTP server")
    http.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
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
        help="trusted header naming the tenant (e.g. X-Tenant-Id, set by a gateway in front); "
        "requests of different tenants never share KV blocks",
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
        help="on SIGTERM, seconds to let running requests finish before aborting them",
    )
    http.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    http.add_argument(
        "--disable-uvicorn-access-log", action="store_true", help="do not log every request"
    )
    eng = parser.add_argument_group("engine")
    defaults = EngineConfig()
    eng.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    eng.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache size in GB")
    eng.add_argument("--gpu-memory-utilization", type=float, default=defaults.gpu_memory_utilization)
    eng.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    eng.add_argument("--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens)
    eng.add_argument(
        "--long-prefill-token-threshold", type=int, default=defaults.long_prefill_token_threshold,
        help="a prefill longer than this advances at most this many tokens per step, so "
        "shorter prompts are not held behind it (default 0: no limit)",
    )
    eng.add_argument("--block-size", type=int, default=defaults.block_size)
    eng.add_argument("--dtype", default=defaults.dtype, help="auto, float32, float16 or bfloat16")
    eng.add_argument("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N")
    eng.add_argument("--seed", type=int, default=defaults.seed)
    eng.add_argument("--revision", default=None, help="hub revision of MODEL")
    eng.add_argument("--max-logprobs", type=int, default=defaults.max_logprobs)
    eng.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=defaults.enable_prefix_caching,
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
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        kv_warehouse = kv_config_from_args(args)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    config = EngineConfig(
        model=args.model,
        dtype=args.dtype,
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
        kv_warehouse=kv_warehouse if kv_warehouse.enabled() else None,
    )
    try:
        config.validate()
        if args.max_waiting_requests < 1:
            raise ValueError(f"--max-waiting-requests must be >= 1; got {args.max_waiting_requests}")
        if args.shutdown_timeout < 0:
            raise ValueError(f"--shutdown-timeout must be >= 0; got {args.shutdown_timeout}")
        chat_template = _read_chat_template(args.chat_template)
        sock = _bind(args.host, args.port)
    except (ValueError, OSError) as exc:
        logger.error("%s", exc)
        return 2
    if args.model is None:
        from soberana.models.demo import DEMO_NAME, LABEL

        logger.warning(
            "No MODEL given: serving the built-in demo model %r (%s); its answers are "
            "meaningless. To serve a real model: `soberana serve /path/to/hf-model-dir` "
            "or `soberana serve organisation/name`.",
            DEMO_NAME,
            LABEL,
        )
    return _event_loop_runner()(_serve(args, config, chat_template, sock))


async def _serve(
    args: argparse.Namespace, config: EngineConfig, chat_template: str | None, sock: socket.socket
) -> int:
    engine = EngineClient(config, args.max_waiting_requests, chat_template)
    app = build_app(engine, ServerSettings(args.served_model_name, _api_keys(args), args.tenant_header))
    server = _Server(
        uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
            access_log=not args.disable_uvicorn_access_log,
            timeout_graceful_shutdown=args.shutdown_timeout,
        )
    )
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
        "ready: serving %s (max_model_len %d, %s, %s) at %s/v1",
        ", ".join(args.served_model_name or [info.name]),
        info.max_model_len,
        info.device,
        info.dtype,
        url,
    )
    await serving
    logger.info("HTTP server stopped; stopping the engine")
    await engine.shutdown()
    return 0


class _Server(uvicorn.Server):
    """uvicorn, except that a drained SIGTERM ends with exit code 0.

    uvicorn re-raises the caught signal after its graceful shutdown, so the process would
    die of it (exit -15) even though every request finished.
    """

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
