"""GPU telemetry through the real reader/collector code, over a replayed NVML recording."""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace
from typing import NamedTuple

from soberana.telemetry.collector import GPUCollector
from soberana.telemetry.fields import FIELDS
from soberana.telemetry.monitor import TelemetryMonitor
from soberana.telemetry.nvml import NVMLReader
from tests.telemetry.fake_nvml import FakeNVML

GiB = 2**30


class Sample(NamedTuple):
    name: str
    labels: dict
    value: float


def scrape(monitor: TelemetryMonitor) -> dict:
    """Render as the exporter does and parse the text the way Prometheus reads it."""
    text = GPUCollector(monitor, hostname="gpu-host-1").render().decode()
    parsed = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, labels, value = re.fullmatch(r"([^{ ]+)(?:\{(.*)\})? (\S+)", line).groups()
        pairs = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels or ""))
        parsed.append(Sample(name, pairs, float(value)))
    return {"_samples": parsed, "_text": text}


def samples(scraped: dict, name: str, gpu: str | None = None) -> list:
    return [s for s in scraped["_samples"] if s.name == name and (gpu is None or s.labels["gpu"] == gpu)]


class FakeNVMLv2(FakeNVML):
    """A current driver: memory info version 2 reports the driver's reserved memory apart."""

    nvmlMemory_v2 = 0x02000028  # pynvml's value; only passed through

    def nvmlDeviceGetMemoryInfo(self, h, version=None):
        mem = dict(self.devices[h]["memory"])
        if version is None:
            return SimpleNamespace(**mem)
        assert version == self.nvmlMemory_v2
        reserved = 512 * 2**20
        return SimpleNamespace(total=mem["total"], reserved=reserved, used=mem["used"] - reserved,
                               free=mem["free"])


def test_every_dcgm_field_is_exported_with_dcgm_labels():
    # A current driver (memory info version 2) fills every field, reserved memory included.
    monitor = TelemetryMonitor([NVMLReader(FakeNVMLv2("h100_sxm_x2"))])
    monitor.poll()
    scraped = scrape(monitor)
    for field in FIELDS:
        gpu0 = samples(scraped, field.name, "0")
        assert len(gpu0) == 1, field.name
    labels = samples(scraped, "DCGM_FI_DEV_GPU_TEMP", "0")[0].labels
    assert labels == {
        "gpu": "0", "UUID": "GPU-4b7c1f2e-9d3a-4c51-8e8f-0a1b2c3d4e5f",
        "pci_bus_id": "00000000:18:00.0", "device": "nvidia0",
        "modelName": "NVIDIA H100 80GB HBM3", "Hostname": "gpu-host-1",
    }
    # DCGM's names exactly: counters carry no `_total` suffix, as dcgm-exporter writes them.
    assert "# TYPE DCGM_FI_DEV_ECC_DBE_VOL_TOTAL counter" in scraped["_text"]
    assert "\nDCGM_FI_DEV_ECC_DBE_VOL_TOTAL{" in scraped["_text"]


def test_values_are_in_dcgm_units(fake_nvml):
    monitor = TelemetryMonitor([NVMLReader(fake_nvml)])
    monitor.poll()
    s = scrape(monitor)
    value = lambda name: samples(s, name, "0")[0].value  # noqa: E731
    assert value("DCGM_FI_DEV_FB_TOTAL") == 85520809984 / 2**20  # MiB
    assert value("DCGM_FI_DEV_FB_USED") == 70 * 1024
    assert value("DCGM_FI_DEV_FB_USED") + value("DCGM_FI_DEV_FB_FREE") == value("DCGM_FI_DEV_FB_TOTAL")
    assert value("DCGM_FI_DEV_POWER_USAGE") == 118.432  # W from mW
    assert value("DCGM_FI_DEV_GPU_TEMP") == 41
    assert value("DCGM_FI_DEV_SM_CLOCK") == 1980 and value("DCGM_FI_DEV_MEM_CLOCK") == 2619
    assert value("DCGM_FI_DEV_GPU_UTIL") == 97
    assert value("DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL") == 123456789 + 987654321
    assert value("DCGM_FI_DEV_XID_ERRORS") == 0


def test_unsupported_fields_give_no_series_not_zero(fake_nvml):
    monitor = TelemetryMonitor([NVMLReader(fake_nvml)])
    monitor.poll()
    s = scrape(monitor)
    # GPU 1 was recorded without NVLink and without page retirement (NOT_SUPPORTED).
    assert samples(s, "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", "1") == []
    assert samples(s, "DCGM_FI_DEV_RETIRED_DBE", "1") == []
    assert samples(s, "DCGM_FI_DEV_GPU_TEMP", "1")[0].value == 42
    assert samples(s, "DCGM_FI_DEV_CLOCKS_EVENT_REASONS", "1")[0].value == 1  # GpuIdle


def test_xid_error_sets_the_gauge_and_logs(fake_nvml, caplog):
    monitor = TelemetryMonitor([NVMLReader(fake_nvml)])
    monitor.poll()
    fake_nvml.inject_xid(1, 79)  # "GPU has fallen off the bus"
    with caplog.at_level(logging.ERROR, logger="soberana.telemetry"):
        monitor.poll()
    s = scrape(monitor)
    assert samples(s, "DCGM_FI_DEV_XID_ERRORS", "1")[0].value == 79
    assert samples(s, "DCGM_FI_DEV_XID_ERRORS", "0")[0].value == 0
    assert "XID 79" in caplog.text


def test_throttle_reasons_are_read_from_the_older_call_on_old_drivers(fake_nvml):
    def missing(handle):  # drivers before r535 lack the new entry point
        import pynvml

        raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

    fake_nvml.nvmlDeviceGetCurrentClocksEventReasons = missing
    fake_nvml.devices[0]["clocks_event_reasons"] = 0x40  # HwThermalSlowdown
    monitor = TelemetryMonitor([NVMLReader(fake_nvml)])
    monitor.poll()
    s = scrape(monitor)
    assert samples(s, "DCGM_FI_DEV_CLOCKS_EVENT_REASONS", "0")[0].value == 0x40
    assert samples(s, "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", "0")[0].value == 0x40


def test_no_gpu_means_no_series_and_no_error():
    class NoDriver:
        def nvmlInit(self):
            import pynvml

            raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    reader = NVMLReader(NoDriver())
    assert not reader.available and reader.read() == []
    monitor = TelemetryMonitor([reader])
    monitor.start()
    monitor.poll()
    assert scrape(monitor)["_samples"] == []
    monitor.stop()


def test_this_cpu_host_has_no_gpu_series():
    """The real pynvml on a host without an NVIDIA driver: no series, no exception."""
    monitor = TelemetryMonitor()
    monitor.poll()
    import torch

    if not torch.cuda.is_available():
        assert scrape(monitor)["_samples"] == []
    monitor.stop()


def test_memory_info_version_2_leaves_reserved_memory_out_of_used():
    monitor = TelemetryMonitor([NVMLReader(FakeNVMLv2("h100_sxm_x2"))])
    monitor.poll()
    s = scrape(monitor)

    def value(name):
        return samples(s, name, "0")[0].value

    assert value("DCGM_FI_DEV_FB_USED") == 70 * 1024 - 512  # as nvidia-smi's memory.used
    assert value("DCGM_FI_DEV_FB_RESERVED") == 512
    assert value("DCGM_FI_DEV_FB_TOTAL") == 85520809984 / 2**20
