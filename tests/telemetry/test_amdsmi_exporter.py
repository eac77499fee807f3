"""AMD GPUs through amdsmi, under DCGM's names: the real reader and collector over amdsmi
replaced at the library boundary (tests/telemetry/fake_amdsmi.py)."""

from __future__ import annotations

from soberana.telemetry.amd import AMDSMIReader
from soberana.telemetry.monitor import TelemetryMonitor
from tests.telemetry.fake_amdsmi import FakeAMDSMI
from tests.telemetry.test_nvml_exporter import samples, scrape

GiB = 2**30


def value(scraped: dict, name: str, gpu: str) -> float | None:
    found = samples(scraped, name, gpu)
    return found[0].value if found else None


def test_amd_readings_use_dcgm_names_units_and_labels():
    monitor = TelemetryMonitor([AMDSMIReader(FakeAMDSMI())])
    monitor.poll()
    s = scrape(monitor)
    (total,) = samples(s, "DCGM_FI_DEV_FB_TOTAL", "0")
    assert total.labels == {
        "gpu": "0",
        "UUID": "1fff74a1-0000-1000-80ab-c6f7d3e0e000",
        "pci_bus_id": "0000:0c:00.0",
        "device": "amdgpu0",
        "modelName": "AMD Instinct MI300X",
        "Hostname": "gpu-host-1",
    }
    assert total.value == 196_592  # MiB, as DCGM_FI_DEV_FB_TOTAL is
    assert value(s, "DCGM_FI_DEV_FB_USED", "0") == 61_440
    assert value(s, "DCGM_FI_DEV_FB_FREE", "0") == 196_592 - 61_440
    assert value(s, "DCGM_FI_DEV_GPU_TEMP", "0") == 48
    assert value(s, "DCGM_FI_DEV_POWER_USAGE", "0") == 312  # W
    assert value(s, "DCGM_FI_DEV_POWER_USAGE", "1") == 140  # the average when current is N/A
    assert value(s, "DCGM_FI_DEV_GPU_UTIL", "0") == 97
    assert value(s, "DCGM_FI_DEV_MEM_COPY_UTIL", "0") == 41
    assert value(s, "DCGM_FI_DEV_SM_CLOCK", "0") == 2100
    assert value(s, "DCGM_FI_DEV_MEM_CLOCK", "0") == 1300
    assert value(s, "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "0") == 0


def test_fields_amd_lacks_give_no_series_not_zero():
    monitor = TelemetryMonitor([AMDSMIReader(FakeAMDSMI())])
    monitor.poll()
    s = scrape(monitor)
    assert value(s, "DCGM_FI_DEV_MEM_COPY_UTIL", "1") is None  # "N/A"
    assert value(s, "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "1") is None  # the call raised
    for name in ("DCGM_FI_DEV_XID_ERRORS", "DCGM_FI_DEV_CLOCKS_EVENT_REASONS",
                 "DCGM_FI_DEV_RETIRED_DBE", "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL"):
        assert samples(s, name) == [], name  # no such reading on AMD: absent, never 0


def test_amd_memory_is_split_by_owner_for_the_headroom_gauge():
    fake = FakeAMDSMI()
    monitor = TelemetryMonitor([AMDSMIReader(fake)], own_pids=lambda: {4242}, threshold=0.92)
    monitor.poll()
    s = scrape(monitor)
    by_owner = {x.labels["owner"]: x.value for x in samples(s, "soberana:gpu_memory_used_bytes", "0")}
    assert by_owner == {"soberana": 60 * GiB, "other": 61_440 * 2**20 - 60 * GiB}
    fake.vram_used_mb[0] = 190_000  # another process fills the card past 92%
    monitor.poll()
    assert value(scrape(monitor), "soberana:gpu_memory_over_threshold", "0") == 1


def test_no_amd_driver_means_no_reader_and_no_error():
    reader = AMDSMIReader(FakeAMDSMI(broken=True))
    assert not reader.available and reader.read() == []
    monitor = TelemetryMonitor([reader])
    assert not monitor.available
    assert scrape(monitor)["_text"] == ""
