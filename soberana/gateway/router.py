"""Pick the backend for a request: filter by capability, context and privacy, then order by
health, pool, region, prefix affinity and load."""

from __future__ import annotations

import random
import time
from collections.abc import Collection, Sequence

from soberana.gateway.affinity import HashRing
from soberana.gateway.backend import BackendState
from soberana.gateway.config import RoutingConfig
from soberana.gateway.errors import GatewayError
from soberana.gateway.request_info import RequestNeeds


class Router:
    """Routing over one catalog snapshot; backends' live state is read at each decision."""

    def __init__(
        self,
        backends: dict[str, list[BackendState]],
        rings: dict[str, HashRing],
        routing: RoutingConfig,
    ) -> None:
        self.backends = backends  # public model -> its backends, in config order
        self.rings = rings  # public model -> affinity ring over its backend names
        self.routing = routing

    def candidates(
        self, model: str, needs: RequestNeeds, privacy: Collection[str]
    ) -> list[BackendState]:
        """Backends of `model` able to serve `needs` for a tenant allowed `privacy` classes."""
        backends = self.backends[model]
        capable = [
            b for b in backends if all(c in b.config.capabilities for c in needs.capabilities)
        ]
        if not capable:
            missing = sorted(
                {c for c in needs.capabilities for b in backends if c not in b.config.capabilities}
            )
            raise GatewayError(
                400,
                f"model {model!r} has no backend with the capability this request needs "
                f"({', '.join(missing)})",
                "unsupported_capability",
            )
        fits = [
            b
            for b in capable
            if b.config.context_window is None or needs.context_tokens <= b.config.context_window
        ]
        if not fits:
            largest = max(b.config.context_window or 0 for b in capable)
            raise GatewayError(
                400,
                f"this request needs about {needs.context_tokens} tokens of context (prompt estimate "
                f"plus max_tokens); the largest context window of model {model!r} is {largest}",
                "context_length_exceeded",
                param="messages",
            )
        allowed = [b for b in fits if b.config.privacy in privacy]
        if not allowed:
            raise GatewayError(
                403,
                f"your privacy classes ({', '.join(sorted(privacy))}) exclude every backend of "
                f"model {model!r} that can serve this request",
                "privacy_class_not_allowed",
                type_="permission_error",
            )
        return allowed

    def pick(
        self,
        model: str,
        candidates: Sequence[BackendState],
        needs: RequestNeeds,
        region: str | None,
        exclude: Collection[BackendState],
    ) -> tuple[BackendState, bool] | None:
        """(backend, is_overflow), or None when every usable backend is busy (caller queues).

        Raises a 503 GatewayError when no candidate is healthy and untried.
        """
        now = time.monotonic()
        usable = [b for b in candidates if b not in exclude and b.available(now)]
        if not usable:
            raise GatewayError(
                503,
                f"no healthy backend is left for model {model!r}",
                "no_healthy_backend",
                type_="server_error",
            )
        threshold = self.routing.queue_threshold
        # Overflow only once every primary is saturated (at max_concurrency or a long queue).
        for pool, overflow in (("primary", False), ("overflow", True)):
            free = [b for b in usable if b.config.pool == pool and b.has_capacity(threshold)]
            if free:
                return self._choose(model, free, needs, region), overflow
        return None

    def _choose(
        self, model: str, free: Sequence[BackendState], needs: RequestNeeds, region: str | None
    ) -> BackendState:
        # The requested region first; other regions only when it has nothing free (edge -> central).
        local = [b for b in free if b.config.region == region]
        group = local or free
        if needs.affinity_key is not None and self.routing.prefix_affinity:
            chosen = self.rings[model].pick(
                needs.affinity_key, group, self.routing.affinity_load_factor
            )
            if chosen is not None:
                return chosen
        return min(group, key=lambda b: (b.load(), b.kv_usage, random.random()))
