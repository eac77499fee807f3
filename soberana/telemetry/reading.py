"""One device's readings at one instant: plain data handed from a reader to the collector."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GPUReading:
    """Identity labels (DCGM's) plus the values that could be read; a field the device does
    not support is simply absent, so it yields no series rather than a fake zero."""

    gpu: int
    uuid: str
    model_name: str
    pci_bus_id: str
    device: str  # dcgm-exporter's `device` label: nvidia0, amdgpu1, ...
    values: dict[str, float] = field(default_factory=dict)
    # pid -> bytes of device memory, for every process the driver reports on this card.
    processes: dict[int, int] = field(default_factory=dict)
