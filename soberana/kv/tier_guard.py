"""Calls into tiers that can fail or hang, and must never take the engine with them."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

logger = logging.getLogger("soberana.kv.warehouse")

T = TypeVar("T")

# Errors that mean "the store is not there": skip it for a while instead of waiting on every
# lookup for a timeout.
try:  # the `redis` extra; without it no Redis tier exists to raise these
    from redis import ConnectionError as RedisConnectionError
    from redis import TimeoutError as RedisTimeoutError

    _REDIS_UNREACHABLE: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError)
except ImportError:
    _REDIS_UNREACHABLE = ()
UNREACHABLE = (ConnectionError, TimeoutError, *_REDIS_UNREACHABLE)
ERROR_LOG_INTERVAL_S = 10.0


class TierGuard:
    """Turns every tier failure into a default answer, a counted error and a rate-limited
    warning; skips a tier for `cooldown_s` after it was unreachable.

    `call_bounded` is for the engine's thread: the call runs on the tier's own worker thread
    and the caller waits at most `timeout_s` for it. While a call that ran past that is still
    running, later calls to the tier return the default at once; when it fails (the client's
    socket timeout) the tier is skipped for the cooldown. A hung store (a Redis that accepts
    and never answers) then costs the engine `timeout_s` once per socket timeout plus
    cooldown, instead of the socket timeout on every admission. A slow answer is only a miss
    for that call: it does not take the tier away.
    """

    def __init__(self, count_error: Callable[[str], None], cooldown_s: float = 5.0) -> None:
        self.cooldown_s = cooldown_s
        self._count_error = count_error
        self._down_until: dict[str, float] = {}
        self._last_error_log: dict[str, float] = {}
        self._workers: dict[str, ThreadPoolExecutor] = {}
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()

    def is_down(self, tier: str) -> bool:
        """Whether the tier is being skipped after it was unreachable."""
        return time.monotonic() < self._down_until.get(tier, 0.0)

    def call(self, tier: str, fn: Callable[..., T], *args, default: T) -> T:
        """`fn(*args)`, or `default` when the tier is down or the call fails."""
        now = time.monotonic()
        if now < self._down_until.get(tier, 0.0):
            return default
        try:
            return fn(*args)
        except Exception as e:  # a tier's failure must never reach the engine
            self._failed(tier, fn, e, now)
            return default

    def call_bounded(
        self, tier: str, fn: Callable[..., T], *args, default: T, timeout_s: float
    ) -> T:
        """`call`, run on the tier's worker thread; `default` if it has not answered within
        `timeout_s` (the tier is then skipped for the cooldown) or is still busy with an
        earlier call that timed out."""
        if self.is_down(tier):
            return default
        with self._lock:
            pending = self._pending.get(tier)
            if pending is not None and not pending.done():
                return default
            worker = self._workers.get(tier)
            if worker is None:
                worker = ThreadPoolExecutor(1, thread_name_prefix=f"kv-{tier}")
                self._workers[tier] = worker
            future = worker.submit(self.call, tier, fn, *args, default=default)
            self._pending[tier] = future
        try:
            return future.result(timeout=timeout_s)
        except FutureTimeout:
            error = TimeoutError(f"no answer within {timeout_s} s")
            self._failed(tier, fn, error, time.monotonic(), skip_tier=False)
            return default

    def _failed(
        self, tier: str, fn: Callable, error: Exception, now: float, skip_tier: bool = True
    ) -> None:
        self._count_error(tier)
        if skip_tier and isinstance(error, UNREACHABLE):
            self._down_until[tier] = now + self.cooldown_s
        if now - self._last_error_log.get(tier, float("-inf")) >= ERROR_LOG_INTERVAL_S:
            self._last_error_log[tier] = now
            name = getattr(getattr(fn, "func", fn), "__name__", "call")
            logger.warning("kv %s: %s failed: %r", tier, name, error)

    def close(self) -> None:
        """Stop the workers without waiting for a hung call."""
        with self._lock:
            for worker in self._workers.values():
                worker.shutdown(wait=False, cancel_futures=True)
            self._workers.clear()
