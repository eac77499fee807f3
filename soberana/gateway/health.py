"""Background health probes and load scraping, one task per backend."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from soberana.gateway.backend import BackendState
from soberana.gateway.fleet import Fleet

log = logging.getLogger("soberana.gateway")


class HealthMonitor:
    """Probes each backend's health endpoint and scrapes vLLM-style load gauges."""

    def __init__(self, session: aiohttp.ClientSession, on_change: Callable[[], None]) -> None:
        self.session = session
        self.on_change = on_change  # wakes queued requests: a backend may have become usable
        self.fleet: Fleet | None = None
        self.tasks: dict[tuple[str, str], asyncio.Task] = {}

    async def start(self, fleet: Fleet) -> None:
        """Probe every backend of `fleet` once, then keep probing in the background."""
        self.fleet = fleet
        new = [b for key, b in fleet.by_key.items() if key not in self.tasks]
        await asyncio.gather(*(self.check(b) for b in new))
        for key in list(self.tasks):
            if key not in fleet.by_key:
                self.tasks.pop(key).cancel()
        for backend in new:
            key = (backend.model, backend.name)
            self.tasks[key] = asyncio.create_task(self._loop(backend), name=f"health {key}")

    async def close(self) -> None:
        """Stop every background task."""
        tasks = list(self.tasks.values())
        self.tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def check(self, backend: BackendState) -> None:
        """One probe (and one scrape where the kind has load metrics)."""
        await self.probe(backend)
        if backend.traits.load_metrics is not None:
            await self.scrape(backend)

    async def _loop(self, backend: BackendState) -> None:
        health = self.fleet.config.health
        next_probe = time.monotonic() + health.interval_s
        next_scrape = time.monotonic() + health.metrics_interval_s
        while True:
            scrapes = backend.traits.load_metrics is not None
            wake = min(next_probe, next_scrape) if scrapes else next_probe
            await asyncio.sleep(max(0.0, wake - time.monotonic()))
            health = self.fleet.config.health  # re-read: a reload may change the intervals
            now = time.monotonic()
            if now >= next_probe:
                await self.probe(backend)
                next_probe = time.monotonic() + health.interval_s
            if scrapes and now >= next_scrape:
                await self.scrape(backend)
                next_scrape = time.monotonic() + health.metrics_interval_s

    async def probe(self, backend: BackendState) -> None:
        """GET the kind's health path; 200 within the timeout is healthy."""
        health = self.fleet.config.health
        ok = False
        try:
            async with asyncio.timeout(health.timeout_s):
                async with self.session.get(
                    backend.config.endpoint + backend.traits.health_path, headers=_auth(backend)
                ) as response:
                    await response.read()
                    ok = response.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            ok = False
        was_usable = backend.available(time.monotonic())
        backend.record_probe(ok, health)
        usable = backend.available(time.monotonic())
        if usable != was_usable:
            log.warning(
                "backend %s/%s is %s", backend.model, backend.name, "up" if usable else "down"
            )
        if was_usable and not usable:
            cancelled = backend.cancel_unanswered()
            if cancelled:
                log.warning(
                    "backend %s/%s: %d request(s) it had not answered fail over",
                    backend.model,
                    backend.name,
                    cancelled,
                )
        if usable:
            self.on_change()

    async def scrape(self, backend: BackendState) -> None:
        """Read the waiting-queue and KV-usage gauges from the backend's /metrics."""
        waiting_name, kv_name = backend.traits.load_metrics
        try:
            async with asyncio.timeout(self.fleet.config.health.timeout_s):
                async with self.session.get(
                    backend.config.endpoint + "/metrics", headers=_auth(backend)
                ) as response:
                    if response.status != 200:
                        return
                    text = await response.text()
        except (TimeoutError, aiohttp.ClientError, OSError):
            return
        try:
            values = parse_gauges(text, (waiting_name, kv_name), backend.config.model)
        except ValueError as e:  # not Prometheus text: keep the last values
            log.debug("cannot parse /metrics of %s: %s", backend.name, e)
            return
        before = backend.waiting
        backend.waiting = values.get(waiting_name, 0.0)
        backend.kv_usage = values.get(kv_name, 0.0)
        if backend.waiting < before:
            self.on_change()


def parse_gauges(text: str, names: tuple[str, ...], model: str) -> dict[str, float]:
    """Each named gauge summed over its samples (maximum for ratios).

    A server hosting several models labels samples with `model_name`; then only `model`'s count.
    """
    # Only the wanted lines reach the real parser: a full page costs milliseconds of event loop.
    lines = [line for line in text.splitlines() if line.startswith(names)]
    samples = [
        s
        for family in text_string_to_metric_families("\n".join(lines) + "\n")
        for s in family.samples
        if s.name in names
    ]
    if len({s.labels.get("model_name") for s in samples}) > 1:
        samples = [s for s in samples if s.labels.get("model_name", model) == model]
    values: dict[str, float] = {}
    for s in samples:
        if s.name.endswith(("_perc", "_ratio")):
            values[s.name] = max(values.get(s.name, 0.0), s.value)
        else:
            values[s.name] = values.get(s.name, 0.0) + s.value
    return values


def _auth(backend: BackendState) -> dict[str, str]:
    return {"Authorization": "Bearer " + backend.api_key} if backend.api_key else {}
