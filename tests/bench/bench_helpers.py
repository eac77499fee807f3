"""Process helpers shared by the bench tests' fixtures and end-to-end tests."""

from __future__ import annotations

import select
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate, then kill if it does not exit within 5 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def wait_for_line(proc: subprocess.Popen, prefix: str, timeout_s: float) -> str:
    """The first stdout line of `proc` starting with `prefix`, within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            if line.startswith(prefix):
                return line.strip()
            if not line and proc.poll() is not None:
                break
    raise RuntimeError(f"process did not print {prefix!r} within {timeout_s} s (rc={proc.poll()})")
