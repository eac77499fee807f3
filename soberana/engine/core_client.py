"""The API process's end of the engine-core process: spawn it, send it typed messages, and hand
what it sends back to a callback.

One sender thread writes to the core, so the caller never blocks on the pipe; one reader
thread receives the core's messages (one per engine step) and passes whatever has arrived on
as one batch. Request streams, detokenization and metrics are the server's
(`soberana/server/engine_client.py`); this module knows only the process and its messages.
"""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import multiprocessing.connection
import queue
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection

from soberana.engine.config import EngineConfig
from soberana.engine.core_process import (
    CoreFatal,
    CoreReady,
    FromCore,
    Shutdown,
    ToCore,
    run_engine_core,
)
from soberana.engine.outputs import ModelInfo

logger = logging.getLogger("soberana.engine_core")

# Messages the reader hands on at once at most: when the caller lags the engine, a request's
# handler then wakes once for several tokens (one SSE event) instead of once per token.
_MAX_STEPS_PER_BATCH = 64


class EngineDeadError(RuntimeError):
    """The engine-core process stopped; no request can be served any more."""


class EngineCoreClient:
    """Starts the engine-core process and carries messages to and from it."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._process: multiprocessing.process.BaseProcess | None = None
        self._requests: Connection | None = None  # our end of the pipe to the core
        self._results: Connection | None = None  # our end of the pipe from the core
        self._outbox: queue.SimpleQueue[ToCore | None] = queue.SimpleQueue()
        self._join_lock = threading.Lock()

    @property
    def started(self) -> bool:
        return self._process is not None

    def start(self) -> int:
        """Spawn the core (it loads the model meanwhile); returns its pid."""
        ctx = multiprocessing.get_context("spawn")
        core_requests, self._requests = ctx.Pipe(duplex=False)
        self._results, core_results = ctx.Pipe(duplex=False)
        _grow_pipe(self._results)
        self._process = ctx.Process(
            target=run_engine_core,
            args=(self.config, core_requests, core_results),
            name="soberana-engine-core",
        )
        self._process.start()
        # Close our copies of the core's ends, so either side sees EOF when the other exits.
        core_requests.close()
        core_results.close()
        return self._process.pid

    def wait_ready(self) -> ModelInfo:
        """Block until the core has loaded its model; EngineDeadError if it failed to."""
        assert self._results is not None, "start() first"
        try:
            first: FromCore = self._results.recv()
        except (EOFError, OSError):
            first = CoreFatal(f"engine core process exited with code {self.wait_exit()}")
        if isinstance(first, CoreFatal):
            raise EngineDeadError(first.message)
        assert isinstance(first, CoreReady), f"unexpected first message {type(first).__name__}"
        return first.model_info

    def run_io(self, on_messages: Callable[[list[FromCore]], None]) -> None:
        """Start the sender and reader threads. `on_messages` is called on the reader thread
        with each batch of messages; a batch ending in `CoreFatal` is the last."""
        threading.Thread(target=self._send_loop, name="engine-sender", daemon=True).start()
        threading.Thread(target=self._read_loop, args=(on_messages,), name="engine-reader",
                         daemon=True).start()

    def send(self, message: ToCore) -> None:
        """Queue a message for the core; never blocks."""
        self._outbox.put(message)

    def stop(self, timeout: float) -> bool:
        """Ask the core to stop and wait `timeout` s for it to exit; kill it if it did not.
        Returns whether it exited by itself. Blocking: call it off the event loop."""
        if self._process is None:
            return True
        self._outbox.put(Shutdown())
        self._outbox.put(None)  # the sender's end
        # The sentinel closes when the process exits, whoever reaps it: `join`/`is_alive`
        # rely on waitpid, which says "alive" when another thread or library reaped the child
        # first (seen in the test suite: a clean exit reported as a hang, exit code None).
        if multiprocessing.connection.wait([self._process.sentinel], timeout):
            self._join(5)
            return True
        logger.warning("engine core did not stop within %.0fs; killing it", timeout)
        self._process.kill()
        self._join(5)
        return False

    def wait_exit(self) -> int | None:
        """The core's exit code, after waiting up to 5 s for it to exit (None: still running,
        or reaped by someone else)."""
        assert self._process is not None
        self._join(5)
        return self._process.exitcode

    def _join(self, timeout: float) -> None:
        # multiprocessing's join is not safe from two threads at once (the reader reports the
        # core's death while stop() waits): both call waitpid and one may lose the status.
        with self._join_lock:
            self._process.join(timeout)

    def _send_loop(self) -> None:
        assert self._requests is not None
        while True:
            message = self._outbox.get()
            if message is None:
                return
            try:
                self._requests.send(message)
            except OSError:
                return  # the core is gone; the reader reports it

    def _read_loop(self, on_messages: Callable[[list[FromCore]], None]) -> None:
        assert self._results is not None
        while True:
            batch: list[FromCore] = []
            try:
                batch.append(self._results.recv())
                while len(batch) < _MAX_STEPS_PER_BATCH and self._results.poll(0):
                    batch.append(self._results.recv())
            except (EOFError, OSError):
                batch.append(CoreFatal(f"engine core process exited with code {self.wait_exit()}"))
            on_messages(batch)
            if isinstance(batch[-1], CoreFatal):
                return


def _grow_pipe(conn: Connection) -> None:
    """Give the core's output pipe 1 MiB, so the core never waits on a briefly busy reader."""
    try:
        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
    except OSError:
        pass  # above /proc/sys/fs/pipe-max-size: keep the default 64 KiB
