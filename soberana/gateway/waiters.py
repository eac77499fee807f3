"""The bounded, tenant-fair queue of requests waiting for a free backend slot.

Each model's queue is shared, but no tenant may hold more than its own bound of it, and slots
go out by weighted fair queuing (start-time fair queuing, Goyal et al. 1996): a queued request
is tagged `max(virtual time, its tenant's last tag) + 1 / weight`, the lowest tag is woken
first, and serving a request advances the model's virtual time to its tag. A tenant that
bursts 30 requests queues them behind one another, not in front of everybody else.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass(eq=False)
class Ticket:
    """One queued request's place in its model's queue."""

    model: str
    tenant: str
    tag: float  # virtual finish time; lower is served first
    future: asyncio.Future | None = field(default=None, repr=False)  # set while parked


class SlotWaiters:
    """Requests parked until some backend of their model frees a slot or becomes usable."""

    def __init__(self) -> None:
        self._queued: dict[str, list[Ticket]] = {}  # model -> tickets, in arrival order
        self._last_tag: dict[tuple[str, str], float] = {}  # (model, tenant) -> last tag given
        self._virtual_time: dict[str, float] = {}  # model -> tag of the last request served

    def count(self, model: str) -> int:
        """Requests of `model` queued now."""
        return len(self._queued.get(model, ()))

    def count_tenant(self, model: str, tenant: str) -> int:
        """Requests of `tenant` queued for `model` now."""
        return sum(1 for t in self._queued.get(model, ()) if t.tenant == tenant)

    def enqueue(self, model: str, tenant: str, weight: float) -> Ticket:
        """Join `model`'s queue; the ticket keeps its place across re-checks until `leave`."""
        key = (model, tenant)
        start = max(self._virtual_time.get(model, 0.0), self._last_tag.get(key, 0.0))
        ticket = Ticket(model, tenant, start + 1.0 / weight)
        self._last_tag[key] = ticket.tag
        self._queued.setdefault(model, []).append(ticket)
        return ticket

    def leave(self, ticket: Ticket, served: bool) -> None:
        """Leave the queue: with a slot (`served`), or giving up (timeout, error, client gone)."""
        queued = self._queued.get(ticket.model, [])
        if ticket in queued:
            queued.remove(ticket)
        if served:
            now = self._virtual_time.get(ticket.model, 0.0)
            self._virtual_time[ticket.model] = max(now, ticket.tag)

    async def wait(self, ticket: Ticket, timeout: float) -> None:
        """Park until woken; raises TimeoutError after `timeout` seconds."""
        ticket.future = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await ticket.future
        finally:
            ticket.future = None

    def wake(self, model: str | None = None) -> None:
        """Let `model`'s waiters (every model's, if None) re-check for a slot, lowest tag first.

        Woken tasks resume in the order their futures complete, and each takes a free slot
        before it next yields, so this order is the order in which slots are handed out.
        """
        models = list(self._queued) if model is None else [model]
        for name in models:
            for ticket in sorted(self._queued.get(name, ()), key=lambda t: t.tag):
                if ticket.future is not None and not ticket.future.done():
                    ticket.future.set_result(None)
