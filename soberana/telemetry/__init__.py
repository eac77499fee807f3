"""GPU telemetry (NVML, amdsmi) exposed with DCGM's field names and labels.

`TelemetryMonitor` polls the devices on a thread of its own; `GPUCollector` renders its latest
readings as Prometheus families, so dcgm-exporter's dashboards and alert rules work unchanged.
"""

from soberana.telemetry.collector import GPUCollector
from soberana.telemetry.monitor import TelemetryMonitor

__all__ = ["GPUCollector", "TelemetryMonitor"]
