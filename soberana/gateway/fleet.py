"""The gateway's runtime view of one config: backends' live state, rings, router and tenants."""

from __future__ import annotations

from soberana.gateway.affinity import HashRing
from soberana.gateway.backend import BackendState
from soberana.gateway.config import GatewayConfig
from soberana.gateway.router import Router
from soberana.gateway.tenants import TenantRegistry


class Fleet:
    """Everything a request reads, built from a config; a reload builds a new one and swaps it in.

    Backends and tenants that keep their names keep their live state (in-flight counts, health,
    rate-limit buckets), so requests admitted under the old fleet finish and release correctly.
    """

    def __init__(self, config: GatewayConfig, previous: Fleet | None = None) -> None:
        old = previous.by_key if previous is not None else {}
        self.config = config
        self.by_key: dict[tuple[str, str], BackendState] = {}  # (public model, backend name)
        backends: dict[str, list[BackendState]] = {}
        rings: dict[str, HashRing] = {}
        for model in config.models.values():
            states = []
            for backend_config in model.backends:
                state = old.get((model.name, backend_config.name))
                if state is None:
                    state = BackendState(model.name, backend_config)
                else:
                    state.reconfigure(backend_config)
                self.by_key[(model.name, backend_config.name)] = state
                states.append(state)
            backends[model.name] = states
            rings[model.name] = HashRing([(b.name, b.weight) for b in model.backends])
        self.backends = backends
        self.router = Router(backends, rings, config.routing)
        self.tenants = TenantRegistry(
            config.tenants,
            previous.tenants if previous else None,
            names_in_metrics=config.metrics.tenant_labels,
        )

    def all_backends(self) -> list[BackendState]:
        """Every backend of every model."""
        return list(self.by_key.values())
