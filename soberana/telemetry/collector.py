"""Renders a TelemetryMonitor's latest readings in the Prometheus text format, DCGM's way.

Written out here rather than through prometheus_client: dcgm-exporter declares counters under
their bare DCGM names (`# TYPE DCGM_FI_DEV_ECC_DBE_VOL_TOTAL counter`, no `_total`), which
prometheus_client's exposition cannot produce, and rules written for it expect exactly that.
"""

from __future__ import annotations

import socket

from soberana.telemetry.fields import FIELDS
from soberana.telemetry.monitor import TelemetryMonitor

# dcgm-exporter's labels, in its order.
LABELS = ("gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname")


class GPUCollector:
    """DCGM_FI_DEV_* per GPU, and Soberana's VRAM headroom families when the monitor has them."""

    def __init__(self, monitor: TelemetryMonitor, hostname: str | None = None) -> None:
        self.monitor = monitor
        self.hostname = hostname or socket.gethostname()

    def render(self) -> bytes:
        """The exposition text of the last poll; empty without GPUs."""
        readings, headroom, crossings = self.monitor.snapshot()
        out: list[str] = []
        labels = {r.gpu: _labels(zip(LABELS, (str(r.gpu), r.uuid, r.pci_bus_id, r.device,
                                              r.model_name, self.hostname)))
                  for r in readings}
        for field in FIELDS:
            rows = [(labels[r.gpu], r.values[field.name]) for r in readings if field.name in r.values]
            _family(out, field.name, field.help, field.kind, rows)
        if headroom:
            used = []
            for gpu, h in sorted(headroom.items()):
                used.append((labels[gpu][:-1] + ',owner="soberana"}', h.soberana_bytes))
                used.append((labels[gpu][:-1] + ',owner="other"}', h.other_bytes))
            _family(out, "soberana:gpu_memory_used_bytes",
                    "Device memory in use, by owner: soberana (this server's processes) or other "
                    "(every other process plus memory the driver attributes to none).",
                    "gauge", used)
            _family(out, "soberana:gpu_memory_over_threshold",
                    "1 while total device memory use exceeds --gpu-memory-utilization.", "gauge",
                    [(labels[g], 1.0 if h.over_threshold else 0.0) for g, h in sorted(headroom.items())])
            _family(out, "soberana:gpu_memory_threshold_crossings_total",
                    "Times device memory use went past --gpu-memory-utilization since start.",
                    "counter", [(labels[g], crossings.get(g, 0)) for g in sorted(headroom)])
            if self.monitor.threshold is not None:
                _family(out, "soberana:gpu_memory_utilization_threshold",
                        "The --gpu-memory-utilization this server sized its KV pool under.",
                        "gauge", [("", self.monitor.threshold)])
        return "".join(out).encode()


def _family(out: list[str], name: str, doc: str, kind: str, rows: list[tuple[str, float]]) -> None:
    if not rows:
        return
    out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")
    out.extend(f"{name}{labels} {float(value)!r}\n" for labels, value in rows)


def _labels(pairs) -> str:
    def escape(v: str) -> str:
        return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in pairs) + "}"
