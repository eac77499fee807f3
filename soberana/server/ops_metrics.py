"""Series of /metrics beyond the engine's: whether the engine is up, and GPU telemetry."""

from __future__ import annotations

from typing import Any


def render_engine_up(engine: Any) -> bytes:
    """`soberana:engine_up`: 1 while the engine core answers, 0 while starting or after it died.

    Exported before the engine has attached its own metrics, so an engine that never comes up
    is visible to the "engine down" alert, not only one that died.
    """
    up = 1 if engine.ready and engine.dead_reason is None else 0
    return (
        b"# HELP soberana:engine_up 1 while the engine-core process is up and ready; 0 while "
        b"it starts or after it stopped.\n# TYPE soberana:engine_up gauge\n"
        + f"soberana:engine_up {up}.0\n".encode()
    )
