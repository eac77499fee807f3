"""Polls the GPUs on a thread of its own and keeps the latest readings plus the VRAM headroom.

NVML calls take milliseconds; doing them here, not in a scrape handler on the server's event
loop, keeps /metrics and the API responsive. A scrape renders the last poll.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from soberana.telemetry.reading import GPUReading

logger = logging.getLogger("soberana.telemetry")

_MIB = 1024 * 1024


@dataclass
class Headroom:
    """Device memory of one card split by owner, and whether it is past the threshold."""

    soberana_bytes: int
    other_bytes: int
    total_bytes: int
    over_threshold: bool


class TelemetryMonitor:
    """Latest readings of every GPU (NVIDIA and AMD); empty on a host without GPUs.

    `own_pids` (serve only) names Soberana's processes, so device memory can be split into
    Soberana's and everybody else's; `threshold` is --gpu-memory-utilization.
    """

    def __init__(
        self,
        readers: list | None = None,
        interval_s: float = 5.0,
        own_pids: Callable[[], set[int]] | None = None,
        threshold: float | None = None,
    ) -> None:
        if readers is None:
            readers = _default_readers()
        self.readers = [r for r in readers if r.available]
        self.interval_s = interval_s
        self.own_pids = own_pids
        self.threshold = threshold
        self.latest: list[GPUReading] = []
        self.headroom: dict[int, Headroom] = {}  # by gpu index
        self.threshold_crossings: dict[int, int] = {}  # by gpu index, since start
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return bool(self.readers)

    def start(self) -> None:
        """Poll once now (so the first scrape has data), then every interval on a daemon thread."""
        if not self.available:
            return
        self.poll()
        self._thread = threading.Thread(target=self._run, name="gpu-telemetry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for reader in self.readers:
            reader.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # a driver hiccup must not end telemetry for good
                logger.exception("GPU telemetry poll failed")

    def poll(self) -> list[GPUReading]:
        """Read every device once and update the headroom; returns the readings."""
        readings = [r for reader in self.readers for r in reader.read()]
        own = self.own_pids() if self.own_pids is not None else set()
        headroom = {}
        for reading in readings:
            h = self._headroom(reading, own)
            if h is not None:
                headroom[reading.gpu] = h
        with self._lock:
            self.latest = readings
            self.headroom = headroom
        return readings

    def _headroom(self, reading: GPUReading, own: set[int]) -> Headroom | None:
        if self.own_pids is None or "DCGM_FI_DEV_FB_USED" not in reading.values:
            return None
        values = reading.values
        total = int(values["DCGM_FI_DEV_FB_TOTAL"] * _MIB)
        # Occupied = total - free where the card reports free memory: current NVIDIA drivers
        # leave the memory they reserve out of "used" (nvidia-smi shows 0 MiB on an idle
        # card) while no process can allocate it; measured on an H100, a card that CUDA
        # reported 96% full read 89% by "used" alone.
        if "DCGM_FI_DEV_FB_FREE" in values:
            used = total - int(values["DCGM_FI_DEV_FB_FREE"] * _MIB)
        else:
            used = int(values["DCGM_FI_DEV_FB_USED"] * _MIB)
        mine = sum(b for pid, b in reading.processes.items() if pid in own)
        # Everything not attributed to us (other processes, and driver/context memory the
        # driver reports without a process) counts against the headroom.
        other = max(0, used - mine)
        over = self.threshold is not None and total > 0 and used / total > self.threshold
        before = self.headroom.get(reading.gpu)
        if over and (before is None or not before.over_threshold):
            self.threshold_crossings[reading.gpu] = self.threshold_crossings.get(reading.gpu, 0) + 1
            logger.warning(
                "GPU %d (%s): %.1f of %.1f GiB used (%.0f%%), past --gpu-memory-utilization "
                "%.2f; Soberana holds %.1f GiB, other processes %.1f GiB. Expect allocation "
                "failures or thrashing until they release memory.",
                reading.gpu, reading.uuid, used / 2**30, total / 2**30, 100 * used / total,
                self.threshold, mine / 2**30, other / 2**30,
            )
        return Headroom(mine, other, total, over)

    def snapshot(self) -> tuple[list[GPUReading], dict[int, Headroom], dict[int, int]]:
        with self._lock:
            return list(self.latest), dict(self.headroom), dict(self.threshold_crossings)


def _default_readers() -> list:
    from soberana.telemetry.amd import AMDSMIReader
    from soberana.telemetry.nvml import NVMLReader

    readers: list = [NVMLReader()]
    if not readers[0].available:
        readers.append(AMDSMIReader())
    return readers


def process_tree(root: int | None = None) -> set[int]:
    """`root` (default: this process) and all its descendants, from /proc (Linux)."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return {root}
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # pid (comm) state ppid ...; comm may hold spaces and parentheses.
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found
