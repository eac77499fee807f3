"""The bounded queue of requests waiting for a free backend slot."""

from __future__ import annotations

import asyncio


class SlotWaiters:
    """Requests parked until some backend of their model frees a slot or becomes usable."""

    def __init__(self) -> None:
        # public model -> parked requests; a dict keeps arrival order, so the oldest wakes first
        self._waiting: dict[str, dict[asyncio.Future, None]] = {}

    def count(self, model: str) -> int:
        """Requests of `model` waiting now."""
        return len(self._waiting.get(model, ()))

    async def wait(self, model: str, timeout: float) -> None:
        """Park until woken for `model`; raises TimeoutError after `timeout` seconds."""
        future = asyncio.get_running_loop().create_future()
        parked = self._waiting.setdefault(model, {})
        parked[future] = None
        try:
            async with asyncio.timeout(timeout):
                await future
        finally:
            parked.pop(future, None)

    def wake(self, model: str | None = None) -> None:
        """Let `model`'s waiters (every model's, if None) re-check for a slot."""
        groups = self._waiting.values() if model is None else [self._waiting.get(model, {})]
        for parked in groups:
            for future in parked:
                if not future.done():
                    future.set_result(None)
