"""One backend's live state: load, health and ejection, as seen by the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator

from soberana.gateway.config import BackendConfig, HealthConfig
from soberana.gateway.kinds import TRAITS, KindTraits


class BackendState:
    """Mutable runtime state of one backend of one public model (survives config reloads)."""

    def __init__(self, model: str, config: BackendConfig) -> None:
        self.model = model  # the public model name this backend serves
        self.config = config
        self.traits: KindTraits = TRAITS[config.kind]
        self.api_key: str | None = (
            os.environ.get(config.api_key_env) if config.api_key_env else None
        )
        self.outstanding = 0  # requests this gateway has in flight to it
        self.healthy = True  # last verdict of the active probes
        self.probe_failures = 0  # consecutive failed probes
        self.request_failures = 0  # consecutive failed requests (passive check)
        self.ejected_until = 0.0  # time.monotonic() before which it gets no traffic
        self.waiting = 0.0  # scraped queue length (vLLM-style /metrics); 0 when not scraped
        self.kv_usage = 0.0  # scraped KV-cache usage, 0..1
        # Deadlines of attempts that have sent their client nothing yet: expired at once when
        # a probe marks the backend down, so they fail over instead of waiting out first_byte_s.
        self.unanswered: set[asyncio.Timeout] = set()

    @property
    def name(self) -> str:
        return self.config.name

    def reconfigure(self, config: BackendConfig) -> None:
        """Take a reloaded config while keeping load and health (in-flight requests still count)."""
        self.config = config
        self.traits = TRAITS[config.kind]
        self.api_key = os.environ.get(config.api_key_env) if config.api_key_env else None

    def available(self, now: float) -> bool:
        """Healthy and not ejected: may receive traffic."""
        return self.healthy and now >= self.ejected_until

    def has_capacity(self, queue_threshold: int) -> bool:
        """Below its concurrency cap and its scraped queue is short enough."""
        cap = self.config.max_concurrency
        return (cap is None or self.outstanding < cap) and self.waiting <= queue_threshold

    def load(self) -> float:
        """Outstanding plus queued requests per unit of weight; lower is better."""
        return (self.outstanding + self.waiting) / self.config.weight

    def record_success(self) -> None:
        """A request completed: the passive failure streak ends."""
        self.request_failures = 0

    def record_failure(self, health: HealthConfig) -> bool:
        """A request failed (connection, timeout, 5xx); returns True if this ejects the backend."""
        self.request_failures += 1
        if self.request_failures >= health.eject_after and time.monotonic() >= self.ejected_until:
            self.ejected_until = time.monotonic() + health.cooldown_s
            self.request_failures = 0
            return True
        return False

    def record_probe(self, ok: bool, health: HealthConfig) -> None:
        """Fold one active probe's result into the health verdict."""
        if ok:
            self.probe_failures = 0
            self.healthy = True
        else:
            self.probe_failures += 1
            if self.probe_failures >= health.unhealthy_after:
                self.healthy = False

    @contextlib.contextmanager
    def watch(self, deadline: asyncio.Timeout) -> Iterator[None]:
        """While inside, `cancel_unanswered` can expire `deadline`."""
        self.unanswered.add(deadline)
        try:
            yield
        finally:
            self.unanswered.discard(deadline)

    def cancel_unanswered(self) -> int:
        """Expire every watched deadline now (their attempts raise TimeoutError); how many."""
        now = asyncio.get_running_loop().time()
        pending, self.unanswered = self.unanswered, set()
        for deadline in pending:
            if not deadline.expired():
                deadline.reschedule(now)
        return len(pending)

    def ejected(self) -> bool:
        """Inside its ejection cooldown."""
        return time.monotonic() < self.ejected_until
