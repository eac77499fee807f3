"""Run the gateway: listen, probe the fleet, reload on SIGHUP, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import disable_created_metrics

from soberana.gateway.app import build_app
from soberana.gateway.config import GatewayConfig
from soberana.gateway.config_loader import ConfigError, load_config
from soberana.gateway.fleet import Fleet
from soberana.gateway.health import HealthMonitor
from soberana.gateway.metrics import GatewayMetrics
from soberana.gateway.proxy import Proxy
from soberana.gateway.upstream import Upstream
from soberana.tracing import Tracing

log = logging.getLogger("soberana.gateway")

# Shorter than common upstream keep-alive timeouts (uvicorn: 5 s) so a pooled connection is
# dropped here before the upstream closes it under a request.
_UPSTREAM_KEEPALIVE_S = 3.0
_DRAIN_S = 30.0  # on SIGTERM, in-flight requests get this long to finish


class GatewayServer:
    """One running gateway process."""

    def __init__(
        self, config_path: Path, config: GatewayConfig, host: str, port: int,
        tracing: Tracing | None = None,
    ) -> None:
        self.config_path = config_path
        self.tracing = tracing
        self.host = host
        self.port = port
        self.initial_config = config
        self.proxy: Proxy | None = None
        self.monitor: HealthMonitor | None = None
        self._reload_lock = asyncio.Lock()
        self._stop = asyncio.Event()

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT."""
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=_UPSTREAM_KEEPALIVE_S)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None)
        ) as session:
            disable_created_metrics()  # `_created` series double the page and nobody reads them
            fleet = Fleet(self.initial_config)
            metrics = GatewayMetrics(lambda: self.proxy.fleet.all_backends())
            self.proxy = Proxy(fleet, Upstream(session), metrics)
            self.proxy.privacy.configure(fleet.config.privacy)  # open the audit log now
            self.monitor = HealthMonitor(session, on_change=self.proxy.waiters.wake)
            await self.monitor.start(fleet)
            # handler_cancellation: a client that disconnects cancels its handler, which drops
            # the upstream request and frees its slots (aiohttp's default keeps it running).
            runner = web.AppRunner(
                build_app(self.proxy, metrics, self.tracing),
                access_log=None,
                shutdown_timeout=_DRAIN_S,
                handler_cancellation=True,
            )
            await runner.setup()
            site = web.TCPSite(runner, self.host, self.port, backlog=1024, reuse_address=True)
            await site.start()
            port = runner.addresses[0][1]
            # Everything allocated so far lives for the whole process: keep it out of the
            # collector's generations so full collections stay short on the request path.
            gc.freeze()
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
            loop.add_signal_handler(signal.SIGTERM, self._stop.set)
            loop.add_signal_handler(signal.SIGINT, self._stop.set)
            # Tests and supervisors read this line to learn the port (`--port 0` picks a free one).
            print(f"soberana gateway listening on http://{self.host}:{port}", flush=True)
            try:
                await self._stop.wait()
                log.info("shutting down: finishing in-flight requests (up to %.0f s)", _DRAIN_S)
            finally:
                await self.monitor.close()
                await runner.cleanup()
                self.proxy.privacy.close()  # flush and fsync the audit log

    async def reload(self) -> None:
        """Re-read the config; on success swap the fleet in, keeping live state and requests."""
        async with self._reload_lock:
            try:
                config = load_config(self.config_path)
            except ConfigError as e:
                log.error("reload failed, still serving the previous config: %s", e)
                return
            if (config.host, config.port) != (
                self.proxy.fleet.config.host,
                self.proxy.fleet.config.port,
            ):
                log.warning("server.host/port changes take effect only on restart")
            fleet = Fleet(config, previous=self.proxy.fleet)
            await self.monitor.start(fleet)  # new backends are probed before they get traffic
            self.proxy.fleet = fleet
            self.proxy.waiters.wake()
            log.warning(
                "reloaded %s: %d models, %d backends, %d tenants",
                self.config_path,
                len(config.models),
                len(fleet.by_key),
                len(config.tenants),
            )
